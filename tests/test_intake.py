"""The batch intake's take, on the real Redis (db 15): what it records, and what it leaves behind."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from jobqueue.protocol import QUEUE_NAME, TASK_NAME, held_key, new_job_id
from jobqueue.queue.intake import Intake
from jobqueue.queue.liveness import consumer_id

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's default key names


@pytest.fixture
def intake(redis_url, redis_client):
    from worker.app import celery_config
    from worker.settings import WorkerSettings

    def wipe():
        redis_client.delete(QUEUE_NAME, UNACKED, UNACKED_INDEX, held_key(consumer_id()))

    wipe()
    app = Celery("intake-test", set_as_current=False)
    app.conf.update(celery_config(WorkerSettings(redis_url=redis_url)))
    taker = Intake(app)
    yield app, taker
    taker.close()
    app.close()
    wipe()


def _envelope(delivery_tag, body: str) -> bytes:
    return json.dumps({
        "body": body, "content-type": "application/json", "content-encoding": "utf-8",
        "headers": {"task": TASK_NAME, "id": new_job_id()},
        "properties": {"body_encoding": "base64", "delivery_tag": delivery_tag,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE_NAME}},
    }).encode()


def test_entries_that_are_not_envelopes_are_dropped_without_a_trace(intake, redis_client):
    _, taker = intake
    redis_client.lpush(QUEUE_NAME, _envelope(12345, "e30="))  # a number where kombu writes a string tag
    redis_client.lpush(QUEUE_NAME, _envelope("tag-bad-body", "not base64 at all!"))  # fails in Python
    assert taker.take(5, wait_s=0) == []
    assert redis_client.llen(QUEUE_NAME) == 0
    # Nothing is left recorded as held by this live process, where no one would ever settle it.
    assert redis_client.hlen(UNACKED) == 0 and redis_client.zcard(UNACKED_INDEX) == 0
    assert redis_client.scard(held_key(consumer_id())) == 0


def _send(app, count: int) -> list[str]:
    """Queue ``count`` jobs through Celery; their ids."""
    job_ids = [new_job_id() for _ in range(count)]
    for job_id in job_ids:
        app.send_task(TASK_NAME, kwargs={"message": {"request": {"text": "好吃"}}}, task_id=job_id)
    return job_ids


def test_unsettled_jobs_are_handed_back_on_request(intake, redis_client):
    app, taker = intake
    job_ids = _send(app, 2)
    taken = taker.take(5, wait_s=0)
    assert [item.job_id for item in taken] == job_ids and redis_client.llen(QUEUE_NAME) == 0
    taker.hand_back_unsettled()  # what the worker does once a refusing Redis takes writes again
    assert redis_client.llen(QUEUE_NAME) == 2 and redis_client.hlen(UNACKED) == 0


def test_a_message_redis_cannot_decode_is_taken_and_recorded(intake, redis_client):
    app, taker = intake
    job_id = new_job_id()
    app.send_task(TASK_NAME, kwargs={"message": {"request": {"text": "\ud800"}}}, task_id=job_id)
    [taken] = taker.take(5, wait_s=0)
    assert taken.job_id == job_id
    tag = taken.message.delivery_tag
    assert redis_client.hexists(UNACKED, tag) and redis_client.sismember(held_key(consumer_id()), tag)
    taken.ack()
    assert redis_client.hlen(UNACKED) == 0


def test_a_job_handed_back_and_taken_by_another_consumer_is_not_handed_back_twice(intake, redis_client):
    """A turn that must wait goes back to the queue; Celery's consumer takes it; the next take of
    the batch intake must not push that (settled) message into the queue once more."""
    app, taker = intake
    _send(app, 1)
    [taken] = taker.take(5, wait_s=0)
    taken.requeue()
    with app.connection_for_read() as other:  # Celery's consumer in the worker's parent
        delivered = other.default_channel.basic_get(QUEUE_NAME, no_ack=False)
        assert delivered is not None and redis_client.hlen(UNACKED) == 1
        assert taker.take(5, wait_s=0) == []  # hands back its own unsettled messages only
        assert redis_client.llen(QUEUE_NAME) == 0 and redis_client.hlen(UNACKED) == 1
        delivered.ack()


def test_a_take_for_joiners_leaves_the_batch_s_own_messages_held(intake, redis_client):
    # A running batch holds its jobs' messages unsettled; taking joiners must not hand them back
    # (they went to the head of the queue, and the next take returned copies of running jobs).
    app, taker = intake
    running = _send(app, 2)
    held = taker.take(5, wait_s=0)
    [waiting] = _send(app, 1)
    joined = taker.take(5, wait_s=0, hand_back=False)
    assert [job.job_id for job in held] == running and [job.job_id for job in joined] == [waiting]
    assert redis_client.llen(QUEUE_NAME) == 0 and redis_client.hlen(UNACKED) == 3
    assert redis_client.scard(held_key(consumer_id())) == 3


@pytest.mark.parametrize("lane", ["interactive", "bulk"])
def test_a_job_put_back_to_wait_keeps_its_lane_and_its_tenant(intake, redis_client, lane):
    # A job whose earlier turn still runs (or whose dead runner's claim holds) goes back to the end
    # of its own lane: the Redis lanes count priorities the other way round from RabbitMQ's.
    from jobqueue.queue import line
    from jobqueue.queue.brokers import requeue_later
    from jobqueue.queue.transport import lane_keys

    app, _ = intake
    job_id, tenant = new_job_id(), f"tenant-{new_job_id()}"  # other tests leave jobs of their tenants
    requeue_later(app, "redis", job_id, {"request": {"text": "好吃", "priority": lane, "tenant": tenant}}, 0.0)
    interactive, *_, bulk = lane_keys(QUEUE_NAME)
    own, other = (interactive, bulk) if lane == "interactive" else (bulk, interactive)
    try:
        assert [m for m in redis_client.lrange(own, 0, -1) if job_id.encode() in m]
        assert not [m for m in redis_client.lrange(other, 0, -1) if job_id.encode() in m]
        assert line.tenant_depths(redis_client).get(tenant) == 1
    finally:
        for key in lane_keys(QUEUE_NAME):
            for message in redis_client.lrange(key, 0, -1):
                if job_id.encode() in message:
                    redis_client.lrem(key, 0, message)
        line.leave(redis_client, job_id)
