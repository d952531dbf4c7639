"""Which broker holds the queue: Redis (the default) or RabbitMQ (``BROKER_URL=amqp://...``).

Producers, the gateway and workers reach the queue only through a ``Broker``:
submit a job (with an idempotency key's ``Claim``, the claimed job's id comes back), re-send one, read the depth and places in line, the lanes a cancel
clears; a worker's batches take jobs through ``intake_for``. Records, conversations and
metrics are in Redis (``REDIS_URL``) with either broker.
"""

from __future__ import annotations

import time
from typing import Protocol

from celery import Celery

from jobqueue.protocol import LINE_KEY, QUEUE_NAME, JobMessage, JobRecord
from jobqueue.settings import QueueSettings
from jobqueue.store import JobStore
from jobqueue.queue import QUEUE_TRANSPORT, amqp, line, submission
from jobqueue.queue.amqp import AmqpBroker, AmqpIntake
from jobqueue.queue.intake import Intake
from jobqueue.queue.submission import Claim
from jobqueue.queue.transport import lane_keys


class Broker(Protocol):
    kind: str
    #: The place-in-line index's key (``line``), which a read of one job asks in the same round trip;
    #: None where the queue has none (RabbitMQ).
    line_index: str | None

    def submit(self, celery: Celery, record: JobRecord, message: JobMessage, *, ttl_s: int,
               lane_limit: int = 0, claim: Claim | None = None, tenant_limit: int = 0) -> str: ...

    def resend(self, celery: Celery, record: JobRecord) -> None: ...

    def depth(self, celery: Celery) -> int: ...

    def positions(self, celery: Celery, job_ids: list[str]) -> dict[str, int]: ...

    def cancel_lanes(self) -> list[str]: ...

    def tenant_depths(self) -> dict[str, int]: ...


class RedisBroker:
    """The queue in Redis: kombu's Redis transport, hardened (``transport``), with atomic admission."""

    kind = "redis"
    line_index = LINE_KEY

    def __init__(self, store: JobStore, *, max_queue: int):
        self.store = store
        self.max_queue = max_queue

    def submit(self, celery: Celery, record: JobRecord, message: JobMessage, *, ttl_s: int,
               lane_limit: int = 0, claim: Claim | None = None, tenant_limit: int = 0) -> str:
        return submission.submit_job(celery, record, message, max_queue=self.max_queue, ttl_s=ttl_s,
                                     lane_limit=lane_limit, claim=claim, tenant_limit=tenant_limit)

    def resend(self, celery: Celery, record: JobRecord) -> None:
        submission.resend_job(celery, record)

    def depth(self, celery: Celery) -> int:
        return self.store.queue_depth(lane_keys(QUEUE_NAME))

    def positions(self, celery: Celery, job_ids: list[str]) -> dict[str, int]:
        return line.positions(self.store.redis, job_ids)

    def cancel_lanes(self) -> list[str]:
        return lane_keys(QUEUE_NAME)

    def tenant_depths(self) -> dict[str, int]:
        """Jobs waiting per tenant ("" for those without one), from the line index."""
        return line.tenant_depths(self.store.redis)


def broker_for(settings: QueueSettings, store: JobStore) -> Broker:
    """The broker that BROKER_URL (or, unset, REDIS_URL) names; ``store``: the records' Redis."""
    if settings.broker_kind == "amqp":
        return AmqpBroker(store.redis, max_queue=settings.max_queue, quorum=settings.broker_quorum)
    return RedisBroker(store, max_queue=settings.max_queue)


def celery_broker_config(settings: QueueSettings, *, heartbeat_s: float) -> dict:
    """Celery's broker settings. ``heartbeat_s``: on RabbitMQ, the AMQP heartbeat, which sets how soon
    a silent connection is given up and its messages handed back (workers: a third of LIVENESS_TTL_S;
    a producer, which only publishes and runs no loop to send heartbeats: 0, none)."""
    if settings.broker_kind == "amqp":
        return amqp.celery_config(settings.broker, settings.max_queue, settings.broker_quorum, heartbeat_s)
    return {"broker_url": settings.broker, "broker_transport": QUEUE_TRANSPORT}


def intake_for(app: Celery, settings: QueueSettings, *, heartbeat_s: float) -> Intake | AmqpIntake:
    """What a pool process takes more waiting jobs for its batch with."""
    if settings.broker_kind == "amqp":
        return AmqpIntake(app, amqp.job_queue(settings.max_queue, settings.broker_quorum), heartbeat_s)
    return Intake(app)


def requeue_later(celery: Celery, broker_kind: str, job_id: str, raw_message: dict, pause_s: float,
                  retries: int = 0) -> None:
    """Put a delivered job that cannot run yet (an earlier turn, a claim) back at the end of its lane,
    after ``pause_s``. Not Celery's retry: its countdown holds the message in the worker's memory
    until the pool is free, and a batch keeps the pool busy for its whole join window, while a
    message in the queue can join a batch. Its lane's priority is counted as ``broker_kind`` counts
    it (the two brokers count the other way round), and its tenant header keeps its place among its
    tenant's jobs. ``retries``: how many times it was put back before. Raises kombu's errors if the
    publish fails (the caller then hands the delivered message back)."""
    lane_priority = amqp.LANE_PRIORITY if broker_kind == "amqp" else submission.LANE_PRIORITY
    request = raw_message.get("request") if isinstance(raw_message, dict) else None
    request = request if isinstance(request, dict) else {}
    lane = request.get("priority") if request.get("priority") in lane_priority else "interactive"
    tenant = request.get("tenant") if isinstance(request.get("tenant"), str) else ""
    time.sleep(pause_s)
    submission.send_raw(celery, job_id, raw_message, lane, tenant, lane_priority, retries=retries, mandatory=True)
