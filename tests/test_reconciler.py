"""The reconciler's rules, one sweep at a time, on the real Redis (db 15) with a controlled clock."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from jobqueue.protocol import (
    CONSUMERS_KEY,
    LINE_KEY,
    OPEN_JOBS_KEY,
    QUEUE_NAME,
    RECONCILER_LOCK_KEY,
    RESENDS_KEY,
    SUSPECTS_KEY,
    ErrorCode,
    JobStatus,
    consumer_key,
    held_key,
)
from jobqueue.store import JobStore
from jobqueue.queue import CELERY_WIRE_CONFIG, QUEUE_TRANSPORT
from jobqueue.queue.reconciler import Reconciler

GRACE_S = 3.0
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's default key names


@pytest.fixture
def clean(redis_client):
    def wipe():
        redis_client.delete(QUEUE_NAME, UNACKED, UNACKED_INDEX, OPEN_JOBS_KEY, CONSUMERS_KEY, SUSPECTS_KEY, LINE_KEY,
                            RESENDS_KEY, RECONCILER_LOCK_KEY, held_key("dead"), held_key("live"),
                            consumer_key("live"))
    wipe()
    yield redis_client
    wipe()


@pytest.fixture
def reconciler(redis_url, redis_client, clean):
    app = Celery("reconciler-test", broker=redis_url, set_as_current=False)
    app.conf.update(CELERY_WIRE_CONFIG, broker_transport=QUEUE_TRANSPORT)
    sweeper = Reconciler(app, JobStore(redis_client, 60), grace_s=GRACE_S, interval_s=1, max_attempts=2)
    yield sweeper
    sweeper.close()
    app.close()


def _queued_job(make_client, redis_client) -> tuple[str, bytes]:
    """A job submitted as usual, whose message is then popped off the queue: (job id, envelope)."""
    job_id = make_client().submit("好吃")
    return job_id, redis_client.rpop(QUEUE_NAME)


def _hold(redis_client, consumer: str, envelope: bytes) -> str:
    """Record ``envelope`` as unacked and held by ``consumer``, as the transport does; returns its tag."""
    tag = json.loads(envelope)["properties"]["delivery_tag"]
    entry = json.dumps([json.loads(envelope), "qwen-allinone", "qwen-allinone"])
    redis_client.hset(UNACKED, tag, entry)
    redis_client.zadd(UNACKED_INDEX, {tag: 0})
    redis_client.sadd(held_key(consumer), tag)
    redis_client.sadd(CONSUMERS_KEY, consumer)
    return tag


def _queued_ids(redis_client) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(QUEUE_NAME, 0, -1)]


def test_a_dead_processs_messages_go_back_on_the_second_sighting(reconciler, make_client, clean):
    dead_job, dead_envelope = _queued_job(make_client, clean)
    live_job, live_envelope = _queued_job(make_client, clean)
    _hold(clean, "dead", dead_envelope)  # no heartbeat key: dead
    _hold(clean, "live", live_envelope)
    clean.set(consumer_key("live"), 1)

    assert reconciler.sweep(now=1000.0).restored == []  # first sighting: only remembered
    assert reconciler.sweep(now=1000.0 + GRACE_S / 2).restored == []  # too soon
    report = reconciler.sweep(now=1000.0 + GRACE_S)
    assert report.restored == [dead_job]
    assert _queued_ids(clean) == [dead_job]
    assert clean.hkeys(UNACKED) == [json.loads(live_envelope)["properties"]["delivery_tag"].encode()]
    # The dead process is forgotten once nothing of it is left; the live one stays.
    assert clean.smembers(CONSUMERS_KEY) == {b"live"}
    assert live_job not in _queued_ids(clean)


def test_an_open_job_whose_message_is_gone_is_resent_then_failed(reconciler, make_client, clean):
    job_id, _ = _queued_job(make_client, clean)  # popped and dropped: only the open index knows it
    store = JobStore(clean, 60)
    now = 1000.0
    for attempt in (1, 2):
        assert reconciler.sweep(now=now).resent == []
        assert reconciler.sweep(now=now + GRACE_S).resent == [job_id]
        assert _queued_ids(clean) == [job_id] and int(clean.hget(RESENDS_KEY, job_id)) == attempt
        clean.delete(QUEUE_NAME)  # lost again
        now += 10 * GRACE_S
    reconciler.sweep(now=now)
    assert reconciler.sweep(now=now + GRACE_S).finished == [job_id]
    record = store.get(job_id)
    assert record.status is JobStatus.FAILED and record.error.code is ErrorCode.INTERNAL_ERROR
    assert "lost 3 times" in record.error.message
    assert clean.zscore(OPEN_JOBS_KEY, job_id) is None


def test_a_job_past_its_start_deadline_is_expired_not_resent(reconciler, make_client, clean):
    job_id = make_client(queue_timeout_s=1).submit("好吃")
    clean.delete(QUEUE_NAME)
    record = JobStore(clean, 60).get(job_id)
    late = record.start_by + 10
    reconciler.sweep(now=late)
    assert reconciler.sweep(now=late + GRACE_S).finished == [job_id]
    assert JobStore(clean, 60).get(job_id).status is JobStatus.EXPIRED
    assert clean.llen(QUEUE_NAME) == 0


def test_a_queued_job_is_not_touched(reconciler, make_client, clean):
    make_client().submit("好吃")
    for now in (1000.0, 1000.0 + GRACE_S, 1000.0 + 2 * GRACE_S):
        report = reconciler.sweep(now=now)
        assert report.restored == report.resent == report.finished == []
    assert clean.llen(QUEUE_NAME) == 1


def test_one_sweep_at_a_time(reconciler, clean):
    clean.set(RECONCILER_LOCK_KEY, "another worker", ex=60)
    assert reconciler.sweep() is None
    clean.delete(RECONCILER_LOCK_KEY)
    assert reconciler.sweep() is not None
    assert clean.exists(RECONCILER_LOCK_KEY) == 0  # released after the sweep


def test_a_failing_item_does_not_stop_the_sweep_and_a_failed_send_is_not_counted(
    reconciler, make_client, clean, monkeypatch
):
    from jobqueue.queue import reconciler as module

    unlucky, _ = _queued_job(make_client, clean)
    lucky, _ = _queued_job(make_client, clean)
    real_resend = module.resend_job

    def resend(app, record):
        if record.job_id == unlucky:
            raise ConnectionError("the broker went away during this one send")
        return real_resend(app, record)

    monkeypatch.setattr(module, "resend_job", resend)
    reconciler.sweep(now=1000.0)
    report = reconciler.sweep(now=1000.0 + GRACE_S)
    assert report.resent == [lucky] and _queued_ids(clean) == [lucky]
    assert clean.hget(RESENDS_KEY, unlucky) is None  # not sent, not counted
    monkeypatch.setattr(module, "resend_job", real_resend)
    reconciler.sweep(now=1000.0 + 2 * GRACE_S)  # seen lost again: the sweeps after try again
    assert reconciler.sweep(now=1000.0 + 3 * GRACE_S).resent == [unlucky]


def test_the_sweep_clock_is_redis_not_the_host(reconciler, make_client, clean, monkeypatch):
    """Two workers' sweeps compare sightings on one clock, whatever their hosts' clocks say."""
    import time as host_time

    job_id, _ = _queued_job(make_client, clean)
    reconciler.sweep()
    monkeypatch.setattr(host_time, "time", lambda: 4_000_000_000.0)  # this host's clock jumps ahead
    assert reconciler.sweep().resent == []  # Redis says only a moment passed: not yet confirmed
    assert clean.hexists(SUSPECTS_KEY, f"job:{job_id}")


def test_a_queued_message_that_redis_cannot_decode_is_still_seen(reconciler, make_client, clean):
    """A lone surrogate escape in a header: Redis's JSON decoder refuses it, Python's reads it."""
    job_id, envelope = _queued_job(make_client, clean)
    payload = json.loads(envelope)
    payload["headers"]["argsrepr"] = "\ud800"
    clean.lpush(QUEUE_NAME, json.dumps(payload))  # written as the escape \\ud800
    for now in (1000.0, 1000.0 + GRACE_S, 1000.0 + 2 * GRACE_S):
        assert reconciler.sweep(now=now).resent == []
    assert _queued_ids(clean) == [job_id]


def test_a_bulk_job_that_waited_too_long_joins_the_back_of_the_interactive_lane(
    redis_url, clean, make_client
):
    from jobqueue.queue.transport import lane_keys

    app = Celery("reconciler-test", broker=redis_url, set_as_current=False)
    app.conf.update(CELERY_WIRE_CONFIG, broker_transport=QUEUE_TRANSPORT)
    sweeper = Reconciler(app, JobStore(clean, 60), grace_s=GRACE_S, interval_s=1, max_attempts=2,
                         bulk_max_wait_s=30)
    bulk_lane = lane_keys(QUEUE_NAME)[-1]
    try:
        client = make_client()
        old_bulk = client.submit("批量", priority="bulk")
        interactive = client.submit("在线")
        submitted = JobStore(clean, 60).get(old_bulk).submitted_at
        assert clean.llen(bulk_lane) == 1 and _queued_ids(clean) == [interactive]
        assert sweeper.sweep(now=submitted + 29).promoted == []
        assert sweeper.sweep(now=submitted + 31).promoted == [old_bulk]
        # Behind the interactive job that already waited: the list is popped from the right.
        assert _queued_ids(clean) == [old_bulk, interactive] and clean.llen(bulk_lane) == 0
        assert json.loads(clean.lindex(QUEUE_NAME, 0))["properties"]["priority"] == 0
    finally:
        clean.delete(bulk_lane)
        sweeper.close()
        app.close()
