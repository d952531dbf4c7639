"""The production Celery app with fault hooks, for tests only.

Importing ``worker.app`` builds the real app; this module adds, per job, two
markers a test can put in the job's text:

- ``[[slow=S]]``: every model forward pass of this job sleeps S seconds first
  (to observe intermediate states, hit deadlines and kill a job mid-run);
- ``[[fail]]``: the sentiment step raises, as a broken model would.

Run with ``celery -A tests.support.fault_app worker ...``.
"""

from __future__ import annotations

import re
import time

from celery.signals import worker_process_init

from producer.protocol import TASK_NAME
from worker.app import app

_SLOW = re.compile(r"\[\[slow=([0-9.]+)\]\]")
_delay_s = 0.0


@worker_process_init.connect(weak=False)
def _install_hooks(**_):
    # Connected after worker.app's own receiver, so the engine is loaded by now.
    engine = app.tasks[TASK_NAME].runtime.engine
    classify = engine.classify
    reply = engine.reply

    def set_delay(text: str) -> None:
        global _delay_s
        match = _SLOW.search(text)
        _delay_s = float(match.group(1)) if match else 0.0

    def faulty_classify(text, *args, **kwargs):
        set_delay(text)
        if "[[fail]]" in text:
            raise RuntimeError("injected model failure")
        return classify(text, *args, **kwargs)

    def slow_reply(text, *args, **kwargs):
        set_delay(text)
        return reply(text, *args, **kwargs)

    engine.classify = faulty_classify
    engine.reply = slow_reply
    engine.model.register_forward_pre_hook(lambda *_: time.sleep(_delay_s) if _delay_s else None)


__all__ = ["app"]
