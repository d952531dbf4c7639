"""The callback sender's retry bookkeeping, on fakeredis (the HTTP side is in test_api_callbacks.py and
test_api_callback_safety.py)."""

from __future__ import annotations

import time

import fakeredis

from producer.api.callbacks import Ledger
from jobqueue.protocol import CALLBACK_ATTEMPTS_KEY, CALLBACKS_KEY


def _ledger(fake, retry_for_s=600.0):
    return Ledger(fake, lease_s=40.0, retry_for_s=retry_for_s)


def test_the_retry_window_runs_from_the_first_try_not_from_the_jobs_end():
    fake = fakeredis.FakeRedis()
    ledger = _ledger(fake)
    fake.zadd(CALLBACKS_KEY, {"j1": time.time() - 10_000})  # the job ended hours ago; no gateway ran
    ledger.retry_later("j1", "HTTP 500")
    assert fake.zscore(CALLBACKS_KEY, "j1") > time.time()  # tried again later, not given up
    assert int(fake.hget(CALLBACK_ATTEMPTS_KEY, "j1")) == 1


def test_a_callback_is_given_up_after_its_window():
    fake = fakeredis.FakeRedis()
    ledger = _ledger(fake, retry_for_s=1.0)
    fake.zadd(CALLBACKS_KEY, {"j1": 0})
    fake.hset(CALLBACK_ATTEMPTS_KEY, mapping={"j1": 3, "j1:first": time.time() - 5})
    ledger.retry_later("j1", "HTTP 500")
    assert fake.zscore(CALLBACKS_KEY, "j1") is None and fake.hlen(CALLBACK_ATTEMPTS_KEY) == 0
