"""The reconciler: every open job finishes, whatever died or failed on the way.

The job record is the source of truth. Every job whose record is queued or
running is in the open-job index (``OPEN_JOBS_KEY``), added in the same step
as its ``queued`` record (``jobqueue.queue.submission``) and removed in the same
step as its final record (``JobStore.put``). Each worker's parent sweeps every
``RECONCILE_INTERVAL_S``; a Redis lock lets one sweep run at a time across all
workers. A sweep does three things:

1. **Messages of dead processes go back to the queue.** An unacknowledged
   message that no live process holds (its holder's heartbeat lapsed,
   ``jobqueue.queue.liveness``) is moved back to the front of the queue, as
   kombu's visibility timeout would do an hour later.
2. **Open jobs whose message is gone are re-sent.** A job that is open but in
   no queue and no unacked record (a worker killed between kombu's pop and
   its unacked bookkeeping, a re-publish that failed, a hard-time-limit
   bookkeeping write that failed before Celery acked) is re-sent under the
   same id, or finished as ``expired`` if its start deadline passed, or as
   ``failed`` once it has been re-sent ``MAX_ATTEMPTS`` times. The queue is read
   a few thousand messages per sweep, resumed where the last sweep stopped
   (``jobqueue.queue.scan``), so no command holds Redis for long however deep
   the queue: a pass over 10,000 queued jobs spans five sweeps.

3. **Bulk jobs are not starved.** A job in a lower priority lane that has waited
   ``bulk_max_wait_s`` moves to the back of the interactive lane.

Each sweep also drops a few hundred stale entries from the place-in-line index
(``jobqueue.queue.line.prune``), resumed like the read of the queue.

With the queue in RabbitMQ, the broker does the first itself (a dead
consumer's connection closes and its messages go back), the third cannot be
done (a queue cannot be reordered), and the second covers the jobs marked
*unsent* (``jobqueue.queue.amqp``): a publish never confirmed, or a delivered
job acknowledged by Celery without a final record.

The first two act only on what two looks at least ``grace_s`` apart found in the same
state (``SUSPECTS_KEY``: sweeps for the first, passes over the queue for the second), so a message in transit between the queue and a
worker, or a process whose heartbeat a Redis restart wiped, is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field

import redis
from celery import Celery

from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import (
    CONSUMERS_KEY,
    LINE_KEY,
    LINE_SEQ_KEY,
    OPEN_JOBS_KEY,
    QUEUE_NAME,
    RECONCILER_LOCK_KEY,
    RESENDS_KEY,
    SUSPECTS_KEY,
    UNSENT_JOBS_KEY,
    ErrorCode,
    JobError,
    JobStatus,
    consumer_key,
    held_key,
)
from jobqueue.store import JobStore
from jobqueue.outcome import finish, save_final
from jobqueue.queue import line
from jobqueue.queue.amqp import AmqpBroker, unsent_jobs
from jobqueue.queue.line import PUSH_LUA
from jobqueue.queue.scan import QueueScan
from jobqueue.queue.submission import resend_job
from jobqueue.queue.transport import lane_keys

log = logging.getLogger("qwen_allinone.worker")

#: Move an unacked entry back to the front of its queue lanes, with its place in line, unless it
#: changed or went meanwhile. KEYS: unacked hash, unacked index, LINE_KEY, LINE_SEQ_KEY, lanes.
#: ARGV: tag, the entry as read, the payload to queue, its job id (or ''), then each lane's index.
_RESTORE_SCRIPT = PUSH_LUA + """
line_keys = {KEYS[3], KEYS[4]}
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 5, #KEYS do line_push(KEYS[i], ARGV[i], ARGV[3], ARGV[4], true) end
return 1
"""
#: Move a message to the back of the top lane, with its new place in line, unless it left its lane
#: meanwhile. The oldest are looked for from the lane's front (LREM -1), where they are.
#: KEYS: its lane, the top lane, LINE_KEY, LINE_SEQ_KEY. ARGV: the message as read, the message to
#: push, its job id.
_PROMOTE_SCRIPT = PUSH_LUA + """
line_keys = {KEYS[3], KEYS[4]}
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
line_push(KEYS[2], 0, ARGV[2], ARGV[3], false)
return 1
"""
#: A sweep looks at most this many of a lower lane's oldest messages for promotion.
PROMOTE_SCAN = 100
#: Release the lock only if it is still ours.
_UNLOCK_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
#: The lock outlives a sweep (milliseconds) by far, and a worker killed in the middle of one
#: (whole-worker kills landed there) holds up every other worker's sweeps only this long.
LOCK_TTL_S = 10


@dataclass
class SweepReport:
    restored: list[str] = field(default_factory=list)  # job ids whose message went back to the queue
    resent: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # expired or failed without a message
    promoted: list[str] = field(default_factory=list)  # bulk jobs moved to the interactive lane


class Reconciler:
    def __init__(self, app: Celery, store: JobStore, *, grace_s: float, interval_s: float, max_attempts: int,
                 bulk_max_wait_s: float = float("inf"), amqp: AmqpBroker | None = None):
        self.app = app
        self.store = store
        #: The queue in RabbitMQ (None: in Redis). RabbitMQ hands back a dead consumer's messages
        #: itself, and cannot be read; a sweep then only settles the jobs marked unsent.
        self.amqp = amqp
        self.bulk_max_wait_s = bulk_max_wait_s
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.max_attempts = max_attempts
        self._stopped = threading.Event()
        self._connection = None
        #: The read of the queue, a few thousand messages per sweep (``scan``), and where the next
        #: pruning of the place-in-line index starts (``line.prune``).
        self._scan = QueueScan(lane_keys(QUEUE_NAME))
        self._prune_cursor = 0

    # --- running on the worker's own timer ---

    def start(self) -> Reconciler:
        threading.Thread(target=self._run, name="qwen-allinone-reconciler", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as err:  # Redis down, or a bug: the next sweep tries again
                log.warning("reconciler sweep failed: %s: %s", type(err).__name__, err)

    # --- one sweep ---

    def sweep(self, now: float | None = None) -> SweepReport | None:
        """One sweep, or None when another worker holds the lock."""
        client = self.store.redis
        token = uuid.uuid4().hex
        if not client.set(RECONCILER_LOCK_KEY, token, nx=True, ex=LOCK_TTL_S):
            return None
        try:
            return self._sweep(client, _redis_time(client) if now is None else now)
        finally:
            client.eval(_UNLOCK_SCRIPT, 1, RECONCILER_LOCK_KEY, token)

    def _sweep(self, client: redis.Redis, now: float) -> SweepReport:
        if self.amqp is not None:
            return self._sweep_unsent(client, now)
        channel = self._channel()
        unacked = {tag.decode(): raw for tag, raw in client.hgetall(channel.unacked_key).items()}
        held, dead = self._held_by_live_consumers(client)
        report = SweepReport()
        for tag in self._confirm(client, "tag:", [tag for tag in unacked if tag not in held], now):
            with _each("hand back unacked message", tag):
                if self._restore(client, channel, tag, unacked[tag]):
                    report.restored.append(_job_id_of_entry(unacked[tag]) or tag)
        unseen = self._scan.step(client)  # None until a pass over the queue ends
        if unseen is not None:
            present = {_job_id_of_entry(raw) for raw in client.hvals(channel.unacked_key)}
            for job_id in self._confirm(client, "job:", [j for j in unseen if j not in present], now):
                with _each("settle lost job", job_id):
                    self._settle_lost(client, job_id, now, report)
        self._forget(client, dead)
        report.promoted = self._promote_overdue(client, channel, now)
        self._prune_cursor = line.prune(client, self._prune_cursor)
        if report.restored or report.resent or report.finished:
            log.warning("reconciler: handed back %s; re-sent %s; finished %s",
                        report.restored or "-", report.resent or "-", report.finished or "-")
        return report

    def _sweep_unsent(self, client: redis.Redis, now: float) -> SweepReport:
        """RabbitMQ: re-send (or finish) the open jobs marked unsent at least ``grace_s`` ago."""
        report = SweepReport()
        for job_id in unsent_jobs(client, now - self.grace_s):
            with _each("settle unsent job", job_id):
                self._settle_lost(client, job_id, now, report)
        with client.pipeline(transaction=False) as pipe:
            _forget_resends(client, pipe)
            pipe.execute()
        if report.resent or report.finished:
            log.warning("reconciler: re-sent %s; finished %s", report.resent or "-", report.finished or "-")
        return report

    def _held_by_live_consumers(self, client: redis.Redis) -> tuple[set[str], list[str]]:
        """Tags held by processes whose heartbeat is alive, and the ids of dead processes."""
        consumers = sorted(raw.decode() for raw in client.smembers(CONSUMERS_KEY))
        with client.pipeline(transaction=False) as pipe:
            for consumer in consumers:
                pipe.exists(consumer_key(consumer))
            alive = pipe.execute()
        live = [c for c, up in zip(consumers, alive) if up]
        held = {raw.decode() for raw in client.sunion([held_key(c) for c in live])} if live else set()
        return held, [c for c, up in zip(consumers, alive) if not up]

    def _confirm(self, client: redis.Redis, kind: str, found: list[str], now: float) -> list[str]:
        """Of what this look ``found`` (``kind``: ``tag:`` unheld messages, every sweep; ``job:`` lost
        jobs, when a pass over the queue ends), what an earlier look found at least ``grace_s`` ago;
        the rest is remembered for next time, and the suspects of that kind not found again forgotten."""
        seen = {key.decode(): float(value) for key, value in client.hgetall(SUSPECTS_KEY).items()
                if key.decode().startswith(kind)}
        suspects = [kind + item for item in found]
        confirmed = [key for key in suspects if key in seen and now - seen[key] >= self.grace_s]
        waiting = {key: seen.get(key, now) for key in suspects if key not in confirmed}
        with client.pipeline(transaction=True) as pipe:
            if seen:
                pipe.hdel(SUSPECTS_KEY, *seen)
            if waiting:
                pipe.hset(SUSPECTS_KEY, mapping=waiting)
            pipe.execute()
        return [key.removeprefix(kind) for key in confirmed]

    def _restore(self, client: redis.Redis, channel, tag: str, raw: bytes) -> bool:
        try:
            payload, exchange, routing_key = json.loads(raw)
            payload["headers"]["redelivered"] = True
            priority = channel._get_message_priority(payload, reverse=False)
            lanes = [channel._q_for_pri(queue, priority) for queue in channel._lookup(exchange, routing_key)]
        except (ValueError, KeyError, TypeError) as err:
            log.error("reconciler: unacked entry %s is not a kombu message (%s); left to kombu", tag, err)
            return False
        keys = [channel.unacked_key, channel.unacked_index_key, LINE_KEY, LINE_SEQ_KEY, *lanes]
        all_lanes = lane_keys(QUEUE_NAME)
        return bool(client.eval(_RESTORE_SCRIPT, len(keys), *keys, tag, raw, json.dumps(payload),
                                _job_id_of_entry(raw) or "", *(all_lanes.index(lane) for lane in lanes)))

    def _settle_lost(self, client: redis.Redis, job_id: str, now: float, report: SweepReport) -> None:
        """Re-send an open job whose message is gone, or finish it if it may not run any more."""
        try:
            record = self.store.get(job_id)
        except UnreadableRecord:
            record = None
        if record is None or record.status.is_final:
            with client.pipeline(transaction=True) as pipe:  # expired, or finished meanwhile
                pipe.zrem(OPEN_JOBS_KEY, job_id).zrem(UNSENT_JOBS_KEY, job_id).execute()
            return
        resends = int(client.hget(RESENDS_KEY, job_id) or 0)
        if record.status is JobStatus.QUEUED and record.start_by is not None and now > record.start_by:
            error = JobError(code=ErrorCode.EXPIRED, message=(
                f"waited {now - record.submitted_at:.0f}s, past its start deadline; not run (QUEUE_TIMEOUT_S)"))
            save_final(self.store, finish(record, JobStatus.EXPIRED, error))
            report.finished.append(job_id)
        elif record.request is None or resends >= self.max_attempts:
            error = JobError(code=ErrorCode.INTERNAL_ERROR,
                             message=f"its queue message was lost {resends + 1} times; not re-sent again")
            save_final(self.store, finish(record, JobStatus.FAILED, error))
            report.finished.append(job_id)
        else:
            if self.amqp is not None:
                self.amqp.resend(self.app, record)
            else:
                resend_job(self.app, record)
            # Counted after the send: a send that failed is not a re-send.
            client.hincrby(RESENDS_KEY, job_id, 1)
            report.resent.append(job_id)

    def _promote_overdue(self, client: redis.Redis, channel, now: float) -> list[str]:
        """Move the lower lanes' jobs that waited ``bulk_max_wait_s`` to the end of the top lane."""
        top, *lower = lane_keys(QUEUE_NAME)
        promoted = []
        for lane in lower:
            for raw in reversed(client.lrange(lane, -PROMOTE_SCAN, -1)):  # oldest first
                with _each("promote overdue bulk job", lane):
                    payload = json.loads(raw)
                    if now - _submitted_at(payload) < self.bulk_max_wait_s:
                        break  # the rest of this lane waited less
                    payload["properties"]["priority"] = 0  # stays interactive if handed back later
                    if client.eval(_PROMOTE_SCRIPT, 4, lane, top, LINE_KEY, LINE_SEQ_KEY, raw, json.dumps(payload),
                                   payload["headers"]["id"]):
                        promoted.append(payload["headers"]["id"])
        return promoted

    def _forget(self, client: redis.Redis, dead: list[str]) -> None:
        """Drop dead processes whose messages are all back, and re-send counts of finished jobs."""
        unacked_tags = {tag.decode() for tag in client.hkeys(self._channel().unacked_key)}
        with client.pipeline(transaction=False) as pipe:
            for consumer in dead:
                if not {t.decode() for t in client.smembers(held_key(consumer))} & unacked_tags:
                    pipe.delete(held_key(consumer))
                    pipe.srem(CONSUMERS_KEY, consumer)
            _forget_resends(client, pipe)
            pipe.execute()

    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.default_channel

    def close(self) -> None:
        self.stop()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
            self._connection = None


def _forget_resends(client: redis.Redis, pipe) -> None:
    """Drop, in ``pipe``, the re-send counts of jobs no longer open (one ZMSCORE for all of them)."""
    counted = [raw.decode() for raw in client.hkeys(RESENDS_KEY)]
    finished = [job_id for job_id, score in zip(counted, client.zmscore(OPEN_JOBS_KEY, counted) if counted else [])
                if score is None]
    if finished:
        pipe.hdel(RESENDS_KEY, *finished)


@contextlib.contextmanager
def _each(action: str, item: str):
    """One item's failure (an error, a bug) is logged and the sweep goes on with the next."""
    try:
        yield
    except Exception as err:
        log.warning("reconciler: could not %s %s: %s: %s", action, item, type(err).__name__, err)


def _submitted_at(payload: dict) -> float:
    """The job's submission time, from a Celery envelope (its body: base64 JSON [args, kwargs, embed])."""
    return float(json.loads(base64.b64decode(payload["body"]))[1]["message"]["submitted_at"])


def _redis_time(client: redis.Redis) -> float:
    """Redis's clock: one clock for every worker's sweeps, whatever their hosts' clocks say."""
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


def _job_id_of_entry(raw: bytes) -> str | None:
    """The job id of an unacked entry, ``[payload, exchange, routing_key]``."""
    try:
        return json.loads(raw)[0]["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None

