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
    classify_batch = engine.classify_batch
    reply_batch = engine.reply_batch

    def set_delay(texts: list[str]) -> None:
        # A batch runs as fast as its slowest job: the longest delay of its texts.
        global _delay_s
        _delay_s = max((float(m.group(1)) for t in texts if (m := _SLOW.search(t))), default=0.0)

    def faulty_classify_batch(items, *args, **kwargs):
        set_delay([text for text, _ in items])
        if any("[[fail]]" in text for text, _ in items):
            raise RuntimeError("injected model failure")
        return classify_batch(items, *args, **kwargs)

    def slow_reply_batch(requests, *args, **kwargs):
        set_delay([request.text for request in requests])
        return reply_batch(requests, *args, **kwargs)

    engine.classify_batch = faulty_classify_batch
    engine.reply_batch = slow_reply_batch
    engine.model.decoder.register_forward_pre_hook(lambda *_: time.sleep(_delay_s) if _delay_s else None)


__all__ = ["app"]
