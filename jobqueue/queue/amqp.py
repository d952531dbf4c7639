"""RabbitMQ as the queue (``BROKER_URL=amqp://...``); records, conversations and metrics stay in Redis.

What RabbitMQ gives natively replaces our Redis machinery:

- A message held by a consumer whose connection dies (a killed worker, a host
  cut off for longer than the AMQP heartbeat) goes back to the queue at once:
  no liveness sets, no visibility timeout, no reconciler hand-back.
- ``MAX_QUEUE`` is the queue's ``x-max-length`` with ``reject-publish``
  overflow: with publisher confirms, a publish to a full queue is refused
  (nacked) and the job's record, written first, is taken back.
- Priority lanes are the queue's message priorities (classic queues);
  ``BROKER_QUORUM=1`` declares a quorum queue instead, replicated across a
  cluster, which on RabbitMQ 3.x has no priorities.

Admission cannot be one step across two servers. The job's record goes to
Redis first, marked *unsent* (``UNSENT_JOBS_KEY``); the publish follows, and
its confirm clears the mark. A producer that dies in between leaves a marked
record, which the reconciler re-sends once the mark is ``grace_s`` old
(``Reconciler``): at least once, never lost. A second copy of a job is
harmless: a job runs under one claim and its first final record wins.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import amqp as amqp_message
import redis
from amqp.exceptions import AMQPError, MessageNacked, NotFound, PreconditionFailed
from celery import Celery
from kombu import Connection, Exchange, Queue

from jobqueue.errors import BrokerUnavailable, IdempotencyConflict, QueueFull
from jobqueue.protocol import (
    QUEUE_NAME,
    TASK_NAME,
    UNSENT_JOBS_KEY,
    JobMessage,
    JobRecord,
    open_job_score,
)
from jobqueue.queue.intake import POLL_INTERVAL_S, TakenJob, as_job
from jobqueue.queue.submission import Claim, send_job
from jobqueue.record.lua import NEW_RECORD_LUA
from jobqueue.record.writes import new_record_keys

log = logging.getLogger("qwen_allinone.worker")

#: AMQP delivers higher priorities first (Redis's lanes count the other way).
LANE_PRIORITY = {"interactive": 9, "bulk": 0}
#: The classic queue's ``x-max-priority``: one level per lane value above.
MAX_PRIORITY = 9
#: RabbitMQ's answer to a mandatory publish that no queue takes.
NO_ROUTE = 312
#: An idle taker polls RabbitMQ at most this often (each look is a round trip).
AMQP_POLL_INTERVAL_S = max(POLL_INTERVAL_S, 0.01)

#: The record, its open-job entry, its pending turn, the idempotency key's claim (the record module's
#: pieces, ``jobqueue.record.lua``) and the unsent mark, unless the record exists or the claim does.
#: KEYS: record, open jobs, pending turns (or ""), the claim (or ""), unsent jobs. ARGV: record JSON,
#: TTL, open score, job id, the request's digest. Returns {1, ''} when written, {0, ''} when the
#: record already was, {2, job id} when the claim names a job of the same request, {3, job id} when
#: of another. Marks are timed by Redis's clock, which the reconciler reads too, whatever the hosts'
#: clocks say.
_RECORD_SCRIPT = NEW_RECORD_LUA + """
local claimed = claimed_answer(KEYS[4], ARGV[5])
if claimed then return claimed end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ''} end
local now = redis.call('TIME')
write_new_record(KEYS[1], ARGV[1], ARGV[2], KEYS[2], ARGV[3], ARGV[4], KEYS[3], KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[5], now[1] + now[2] / 1e6, ARGV[4])
return {1, ''}
"""
#: Take back what _RECORD_SCRIPT wrote, when RabbitMQ refused the message (the queue is full).
#: Same KEYS; ARGV: record JSON, job id.
_UNDO_SCRIPT = NEW_RECORD_LUA + """
take_back_new_record(KEYS[1], ARGV[1], KEYS[2], ARGV[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[2])
return 1
"""


def job_queue(max_queue: int, quorum: bool) -> Queue:
    """The job queue as every producer and worker declares it (the arguments must agree)."""
    arguments: dict[str, object] = {"x-max-length": max_queue, "x-overflow": "reject-publish"}
    if quorum:
        arguments["x-queue-type"] = "quorum"
        # A quorum queue refuses publishes once it holds more than its limit, a classic one once it
        # holds the limit (measured on RabbitMQ 3.10): one less keeps MAX_QUEUE exact on both.
        arguments["x-max-length"] = max_queue - 1
    else:
        arguments["x-max-priority"] = MAX_PRIORITY
    return Queue(QUEUE_NAME, Exchange(QUEUE_NAME, type="direct"), routing_key=QUEUE_NAME,
                 durable=True, queue_arguments=arguments)


def celery_config(broker_url: str, max_queue: int, quorum: bool, heartbeat_s: float) -> dict:
    """Celery's broker settings for RabbitMQ, the same for producers and workers."""
    return {
        "broker_url": broker_url,
        "task_queues": [job_queue(max_queue, quorum)],
        # A refused publish (the queue is full) raises instead of vanishing.
        "broker_transport_options": {"confirm_publish": True},
        # RabbitMQ hands a silent connection's messages back after two to three heartbeats of silence.
        "broker_heartbeat": heartbeat_s,
    }


class AmqpBroker:
    """The job queue in RabbitMQ."""

    kind = "amqp"
    line_index = None  # RabbitMQ cannot be read without taking: no places in line

    def __init__(self, redis_client: redis.Redis, *, max_queue: int, quorum: bool):
        self.redis = redis_client
        self.max_queue = max_queue
        self.quorum = quorum

    def submit(self, celery: Celery, record: JobRecord, message: JobMessage, *, ttl_s: int,
               lane_limit: int = 0, claim: Claim | None = None, tenant_limit: int = 0) -> str:
        """Record the job (and its idempotency ``claim``) in Redis, then publish it; returns the id of
        the job queued (the claimed one's, when the claim was taken: nothing is written then). Raises
        QueueFull (and takes the record back) when RabbitMQ refuses it, IdempotencyConflict, and
        kombu's errors when either server fails."""
        keys = _record_keys(record, claim)
        written, claimed = self.redis.eval(_RECORD_SCRIPT, len(keys), *keys, record.to_json(), ttl_s,
                                           open_job_score(record), record.job_id, claim.digest if claim else "")
        if written == 3:
            raise IdempotencyConflict(claimed.decode())
        if written == 2:
            return claimed.decode()
        if not written:
            return record.job_id  # a retried submit: queued already, or it is the reconciler's
        try:
            self._publish(celery, record.job_id, message)
        except Exception as err:
            if _caused_by(err, MessageNacked):  # the queue is full
                self._take_back(keys, record)
                raise QueueFull(self.max_queue, self.max_queue) from None
            if _caused_by(err, PreconditionFailed) or (claim is None and _caused_by(
                    err, ConnectionRefusedError, socket.gaierror)):
                # Never sent: RabbitMQ is down, or its queue refuses this producer's declaration. With
                # an idempotency key a refused connection is not taken as "never sent": it may be
                # kombu's retry after a first attempt that arrived, and the claim must keep naming it.
                self._take_back(keys, record)
            # Otherwise it may have arrived (a confirm lost with its connection): the record stays,
            # marked unsent, and the reconciler publishes it again should it not have.
            raise
        self.redis.zrem(UNSENT_JOBS_KEY, record.job_id)
        return record.job_id

    def _publish(self, celery: Celery, job_id: str, message: JobMessage) -> None:
        """Publish as mandatory: a message no queue takes is refused, not silently dropped. Celery
        declares the queue once per connection, so a queue deleted since (by an operator, or a
        broker that lost it) would drop every job; it is declared again, and the job published again."""
        try:
            send_job(celery, job_id, message, LANE_PRIORITY, mandatory=True)
        except Exception as err:
            if _caused_by(err, PreconditionFailed):
                raise BrokerUnavailable(
                    f"RabbitMQ's job queue was declared with other arguments than MAX_QUEUE={self.max_queue} "
                    f"and BROKER_QUORUM={int(self.quorum)}: every producer and worker must agree, or the queue "
                    f"be deleted while empty ({err})") from err
            if _reply_code(err) != NO_ROUTE:
                raise
            log.warning("the job queue was gone; declared it again")
            self.declare(celery)
            send_job(celery, job_id, message, LANE_PRIORITY, mandatory=True)

    def declare(self, celery: Celery) -> None:
        with _fresh_channel(celery) as channel:
            job_queue(self.max_queue, self.quorum)(channel).declare()

    def _take_back(self, keys: list[str], record: JobRecord) -> None:
        self.redis.eval(_UNDO_SCRIPT, len(keys), *keys, record.to_json(), record.job_id)

    def resend(self, celery: Celery, record: JobRecord) -> None:
        """Publish an open job's message again (its first was never confirmed, or it was dropped)."""
        self._publish(celery, record.job_id, JobMessage(request=record.request, submitted_at=record.submitted_at,
                                                        start_by=record.start_by, timeout_s=record.timeout_s))
        self.redis.zrem(UNSENT_JOBS_KEY, record.job_id)

    def depth(self, celery: Celery) -> int:
        """Messages ready in the queue (0 before any worker or producer declared it)."""
        with _fresh_channel(celery) as channel:
            try:
                _, count, _ = channel.queue_declare(QUEUE_NAME, passive=True)
                return int(count)
            except NotFound:  # no queue yet, so nothing waits
                return 0

    def positions(self, celery: Celery, job_ids: list[str]) -> dict[str, int]:
        """RabbitMQ cannot be read without taking: no places in line (clients see the depth)."""
        return {}

    def cancel_lanes(self) -> list[str]:
        # The message stays in RabbitMQ; delivered later, its final record makes it skipped.
        return []

    def tenant_depths(self) -> dict[str, int]:
        """Not known on RabbitMQ: it counts one queue, not its tenants (TENANT_MAX_QUEUE needs Redis)."""
        return {}


def unsent_jobs(client: redis.Redis, older_than: float) -> list[str]:
    """Open jobs whose publish was not confirmed by ``older_than`` (a Unix time)."""
    return [raw.decode() for raw in client.zrangebyscore(UNSENT_JOBS_KEY, "-inf", older_than)]


#: KEYS: unsent jobs. ARGV: job ids. Marks each (by Redis's clock) unless it already is.
_MARK_SCRIPT = """
local now = redis.call('TIME')
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], 'NX', now[1] + now[2] / 1e6, ARGV[i]) end
return 0
"""


def mark_unsent(client: redis.Redis, job_ids: list[str]) -> None:
    """These open jobs may have no message any more (acknowledged without a final record): the
    reconciler re-sends them (Redis finds such jobs by reading its queue; RabbitMQ cannot be read).
    Their final record clears the mark."""
    if job_ids:
        client.eval(_MARK_SCRIPT, 1, UNSENT_JOBS_KEY, *job_ids)


def _record_keys(record: JobRecord, claim: Claim | None) -> list[str]:
    return [*new_record_keys(record, claim.key if claim else None), UNSENT_JOBS_KEY]


@contextlib.contextmanager
def _fresh_channel(celery: Celery) -> Iterator:
    """A channel of its own on a pooled connection (a channel error closes only it), closed after."""
    with celery.pool.acquire(block=True) as connection:
        connection.ensure_connection(max_retries=1)  # a pooled connection may have dropped
        channel = connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it wraps: kombu wraps py-amqp's and the socket's errors in OperationalError."""
    seen: BaseException | None = err
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _reply_code(err: BaseException) -> int | None:
    """The AMQP reply code of ``err`` or of what it wraps (312 for NO_ROUTE)."""
    return next((seen.reply_code for seen in _chain(err) if isinstance(seen, AMQPError) and seen.reply_code), None)


def _caused_by(err: BaseException, *kinds: type[BaseException]) -> bool:
    return any(isinstance(seen, kinds) for seen in _chain(err))


class _Taken:
    """A message taken by the intake. Settling it shares the connection's lock with the heartbeat
    thread; a connection that broke meanwhile already handed the message back (RabbitMQ requeues
    what a closed connection held), so a failed settle is logged, not raised into the batch: the
    job's final record is written first, and a copy delivered later is skipped."""

    def __init__(self, message, intake: AmqpIntake):
        self._message = message
        self._intake = intake

    def __getattr__(self, name):
        return getattr(self._message, name)

    def ack(self) -> None:
        self._settle(requeue=False)

    def reject(self, requeue: bool = False) -> None:
        """``requeue``: back at the end of the queue, as on Redis. RabbitMQ's own requeue puts it back
        at the head, where the next look takes it again: a job that must wait (an earlier turn, a
        claim) would shut out every job behind it. A copy goes to the end first, then this one is
        acknowledged: at least once."""
        self._settle(requeue=requeue)

    def _settle(self, requeue: bool) -> None:
        message = self._message
        with self._intake._lock:
            try:
                if requeue:
                    info = message.delivery_info
                    message.channel.basic_publish(amqp_message.Message(message.body, **message.properties),
                                                  exchange=info["exchange"], routing_key=info["routing_key"])
                message.ack()
            except Exception as err:
                log.warning("job message %s not settled (%s: %s); its connection handed it back",
                            message.headers.get("id"), type(err).__name__, err)
                self._intake._drop_connection(of_channel=message.channel)


class AmqpIntake:
    """Takes waiting job messages with ``basic.get`` and manual acknowledgements, on a connection of
    this pool process's own: if the process dies, RabbitMQ hands them back when the connection does.

    A batch runs for many seconds without touching the connection, so a thread sends its heartbeats
    (RabbitMQ would otherwise close it, and hand a running batch's jobs to another worker).
    py-amqp connections are not thread-safe: every use holds ``_lock``.
    """

    def __init__(self, app: Celery, queue: Queue, heartbeat_s: float):
        self.app = app
        self.queue = queue
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._stopped = threading.Event()
        self._beating: threading.Thread | None = None

    def take(self, limit: int, wait_s: float, *, hand_back: bool = True) -> list[TakenJob]:
        """Up to ``limit`` waiting jobs; waits at most ``wait_s`` for more when the queue runs dry."""
        taken: list[TakenJob] = []
        deadline = time.monotonic() + wait_s
        if hand_back:
            self.hand_back_unsettled()
        pops = 0
        while pops < limit:
            message = self._get()
            if message is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(AMQP_POLL_INTERVAL_S)
                continue
            pops += 1
            if (job := as_job(message)) is not None:
                taken.append(job)
        return taken

    def hand_back_unsettled(self) -> None:
        """Every message this connection holds unsettled goes back to the queue (``basic.recover``)."""
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.default_channel.basic_recover(requeue=True)
                except Exception:
                    self._drop_connection()  # its messages go back with it
                    raise

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            self._drop_connection()

    def _get(self):
        with self._lock:
            try:
                message = self.queue(self._channel()).get(no_ack=False, accept=["json"])
            except Exception:
                # The messages this connection held go back with it; the next take connects anew.
                self._drop_connection()
                raise
        return None if message is None else _Taken(message, self)

    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_read(heartbeat=self.heartbeat_s)
            self._connection.ensure_connection(max_retries=1)
            if self._beating is None:
                self._beating = threading.Thread(target=self._beat, name="qwen-allinone-amqp-heartbeat",
                                                 daemon=True)
                self._beating.start()
        return self._connection.default_channel

    def _drop_connection(self, of_channel=None) -> None:
        """Close the connection; with ``of_channel``, only if that channel is on it (a message taken
        on an earlier connection must not take the running batch's newer one down)."""
        if of_channel is not None and self._connection is not None and \
                getattr(of_channel, "connection", None) is not self._connection.connection:
            return
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
            self._connection = None

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_s / 4):
            with self._lock:
                try:
                    # ``connected``, not ``connection``: kombu's property would reconnect here.
                    if self._connection is not None and self._connection.connected:
                        self._connection.connection.send_heartbeat()
                except Exception as err:  # the connection is gone: the next take makes a new one
                    log.warning("AMQP heartbeat of the batch intake failed: %s", err)
                    self._drop_connection()
