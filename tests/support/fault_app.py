"""The production Celery app with fault hooks, for tests only.

Importing ``worker.app`` builds the real app; this module adds, per job, two
markers a test can put in the job's text:

- ``[[slow=S]]``: every model forward pass of this job sleeps S seconds first
  (to observe intermediate states, hit deadlines and kill a job mid-run);
- ``[[fail]]``: the sentiment step raises, as a broken model would (for jobs that
  start a batch and for jobs that join one).

and one per worker: with ``FAULT_DIE_BEFORE_UNACKED=<path>`` the worker's parent
exits (as ``kill -9`` would end it) right after kombu popped a message and
before it recorded it as unacknowledged, once: it creates ``<path>`` first.

Run with ``celery -A tests.support.fault_app worker ...``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from celery.signals import worker_process_init

from jobqueue.protocol import TASK_NAME
from worker.app import app
from jobqueue.queue import transport

_SLOW = re.compile(r"\[\[slow=([0-9.]+)\]\]")
_delay_s = 0.0


def _die_before_unacked() -> None:
    marker = os.environ.get("FAULT_DIE_BEFORE_UNACKED")
    if not marker or Path(marker).exists():
        return
    append = transport.QoS.append

    def append_or_die(self, message, delivery_tag):
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.killpg(os.getpgrp(), 9)  # the message is popped, not yet recorded anywhere
        return append(self, message, delivery_tag)

    transport.QoS.append = append_or_die


_die_before_unacked()


@worker_process_init.connect(weak=False)
def _install_hooks(**_):
    # Connected after worker.app's own receiver, so the engine is loaded by now.
    engine = app.tasks[TASK_NAME].runtime.engine
    classify_batch = engine.classify_batch
    classify_in_chunks = engine.classify_in_chunks
    open_replies = engine.open_replies

    def set_delay(texts: list[str]) -> None:
        # A batch runs as fast as its slowest job: the longest delay of its texts.
        global _delay_s
        _delay_s = max((float(m.group(1)) for t in texts if (m := _SLOW.search(t))), default=0.0)

    def faulty_classify_batch(items, *args, **kwargs):
        set_delay([text for text, _ in items])
        if any("[[fail]]" in text for text, _ in items):
            raise RuntimeError("injected model failure")
        return classify_batch(items, *args, **kwargs)

    def faulty_classify_in_chunks(items, *args, **kwargs):  # a joiner's sentiment
        sentiment = classify_in_chunks(items, *args, **kwargs)
        if any("[[fail]]" in text for text, _ in items):
            sentiment.close()
            raise RuntimeError("injected model failure")
        advance = sentiment.advance

        def advance_slowly():
            set_delay([text for text, _ in items])
            return advance()

        sentiment.advance = advance_slowly
        return sentiment

    def slow_open_replies(*args, **kwargs):
        # Each decoding step runs as slow as the slowest reply in the session at that step.
        session = open_replies(*args, **kwargs)
        texts: dict[int, str] = {}
        add, step = session.add, session.step

        def add_tracked(request):
            key = add(request)
            if key is not None:
                texts[key] = request.text
            return key

        def step_slowly():
            set_delay([texts[key] for key in session.keys])
            return step()

        session.add, session.step = add_tracked, step_slowly
        return session

    engine.classify_batch = faulty_classify_batch
    engine.classify_in_chunks = faulty_classify_in_chunks
    engine.open_replies = slow_open_replies
    _slow_down_every_pass(engine.model)


def _slow_down_every_pass(model) -> None:
    """Every forward pass of the model sleeps ``_delay_s`` first, on either engine."""
    if hasattr(model, "decoder"):  # torch
        model.decoder.register_forward_pre_hook(lambda *_: time.sleep(_delay_s) if _delay_s else None)
        return
    decode = model.decode  # llama.cpp: one llama_decode per pass

    def slow_decode(*args, **kwargs):
        if _delay_s:
            time.sleep(_delay_s)
        return decode(*args, **kwargs)

    model.decode = slow_decode


__all__ = ["app"]
