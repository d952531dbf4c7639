"""The callback sender's retry bookkeeping, on fakeredis (the HTTP side is in test_api_callbacks.py)."""

from __future__ import annotations

import time

import fakeredis

from producer.api.callbacks import CallbackSender
from producer.client import Client
from jobqueue.protocol import CALLBACK_ATTEMPTS_KEY, CALLBACKS_KEY, JobRecord, JobStatus
from jobqueue.settings import QueueSettings


def _sender(fake, retry_for_s=600.0):
    client = Client(settings=QueueSettings(redis_url="redis://127.0.0.1:1/0"), redis_client=fake)
    return CallbackSender(client, b"secret", retry_for_s)


def _record(finished_at: float) -> JobRecord:
    return JobRecord(job_id="j1", status=JobStatus.SUCCEEDED, request={"text": "x", "callback_url": "http://h/x"},
                     submitted_at=finished_at - 1, finished_at=finished_at)


def test_the_retry_window_runs_from_the_first_try_not_from_the_jobs_end():
    fake = fakeredis.FakeRedis()
    sender = _sender(fake)
    fake.zadd(CALLBACKS_KEY, {"j1": 0})
    sender._retry_later(_record(finished_at=time.time() - 10_000), "HTTP 500")  # no gateway ran for hours
    assert fake.zscore(CALLBACKS_KEY, "j1") > time.time()  # tried again later, not given up
    assert int(fake.hget(CALLBACK_ATTEMPTS_KEY, "j1")) == 1


def test_a_callback_is_given_up_after_its_window():
    fake = fakeredis.FakeRedis()
    sender = _sender(fake, retry_for_s=1.0)
    fake.zadd(CALLBACKS_KEY, {"j1": 0})
    fake.hset(CALLBACK_ATTEMPTS_KEY, mapping={"j1": 3, "j1:first": time.time() - 5})
    sender._retry_later(_record(finished_at=time.time()), "HTTP 500")
    assert fake.zscore(CALLBACKS_KEY, "j1") is None and fake.hlen(CALLBACK_ATTEMPTS_KEY) == 0
