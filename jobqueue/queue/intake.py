"""Taking more waiting jobs for a batch, with the same delivery guarantees as Celery's own.

Celery hands the task one message. When more jobs wait, the task takes up to
``BATCH_MAX - 1`` others straight from the queue, on kombu's Redis channel,
which is what Celery's consumer itself uses. A taken message lands in kombu's
"unacked" set exactly as a delivery to Celery does (in one atomic step, see
``_get``), so if this process dies before acknowledging it, the
reconciler puts it back in the queue for another worker once this process's
heartbeat lapses (``jobqueue.queue.liveness``). Each
taken message is acknowledged by the task right after its job's final record
is written.

Why not ``celery-batches``: it buffers messages in the worker's consumer and
flushes them on a timer or a count, whether or not the pool is free. With one
pool process, jobs that arrive while a batch runs are flushed as separate
small batches that queue behind it, so under load batches stay small; a
single job waits for the flush interval; the whole batch is acknowledged at
once; and a job cannot be retried or rejected on its own (the conversation
turn order needs that). Taking what is already queued when the pool process is
free keeps every one of those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

from celery import Celery
from kombu import Connection
from kombu.message import Message
from kombu.transport.virtual import QoS as VirtualQoS

from jobqueue.protocol import LINE_KEY, LINE_SEQ_KEY, QUEUE_NAME, TASK_NAME, held_key
from jobqueue.queue.line import FAIR_PICK_LUA, PUSH_LUA
from jobqueue.queue.liveness import consumer_id
from jobqueue.queue.transport import UNREADABLE_MESSAGE_ERRORS, lane_keys

log = logging.getLogger("qwen_allinone.worker")

#: How often the queue is looked at again while waiting (at most BATCH_WAIT_MS) for more jobs.
POLL_INTERVAL_S = 0.002

#: Pop the next message and, in the same step, record it as unacknowledged in kombu's own format
#: (kombu.transport.redis.QoS.append): the hash field is the delivery tag and the value is
#: ``[payload, exchange, routing_key]``; the index is scored by time, for the visibility-timeout
#: sweep; the tag joins this process's held set (jobqueue.queue.liveness). The payload is kept as the
#: exact text that was queued. Something Redis's JSON decoder cannot read as an envelope with a string
#: delivery tag is only popped; the caller records it if Python reads it.
#: The next message is the fair order's (``line.FAIR_PICK_LUA``: round robin across the tenants with
#: jobs waiting, each tenant's own jobs highest lane first and oldest first) or, with one tenant
#: waiting, the oldest of the highest lane, as Celery's consumer pops them. The job leaves the
#: place-in-line index (``jobqueue.queue.line``) in the same step.
#: KEYS: unacked hash, unacked index, held set, LINE_KEY, LINE_SEQ_KEY, then the queue's lanes.
#: ARGV: the time, how far from its indexed place a message is looked for.
#: Returns false (queue empty) or {item, the tag it was recorded under or ''}.
_TAKE_SCRIPT = PUSH_LUA + FAIR_PICK_LUA + """
line_keys = {KEYS[4], KEYS[5]}
local lanes = {}
for i = 6, #KEYS do lanes[#lanes + 1] = KEYS[i] end
local item = line_fair_pick(lanes, tonumber(ARGV[2]))
if not item then
  for _, lane in ipairs(lanes) do
    item = redis.call('RPOP', lane)
    if item then break end
  end
end
if not item then return false end
local tag = ''
local ok, payload = pcall(cjson.decode, item)
local id = ok and type(payload) == 'table' and type(payload['headers']) == 'table' and payload['headers']['id']
if type(id) ~= 'string' then id = string.match(item, '"id": "([^"]*)"') end
if id then line_leave(id) end
if ok and type(payload) == 'table' and type(payload['properties']) == 'table'
    and type(payload['properties']['delivery_tag']) == 'string' then
  local info = payload['properties']['delivery_info']
  local exchange, routing_key = '', ''
  if type(info) == 'table' then
    if type(info['exchange']) == 'string' then exchange = info['exchange'] end
    if type(info['routing_key']) == 'string' then routing_key = info['routing_key'] end
  end
  tag = payload['properties']['delivery_tag']
  redis.call('ZADD', KEYS[2], ARGV[1], tag)
  redis.call('SADD', KEYS[3], tag)
  redis.call('HSET', KEYS[1], tag,
    '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
end
return {item, tag}
"""
#: How far from where the line index places it the fair intake looks for a message (as a cancel does).
FAIR_WINDOW = 8


@dataclass
class TakenJob:
    """A job message taken from the queue by the task, not yet acknowledged."""

    job_id: str
    #: The job message (the task's ``message`` keyword argument), unchecked.
    raw_message: object
    #: Names of arguments the task does not take (the job then fails as invalid).
    unexpected: set[str]
    message: Message
    settled: bool = False

    def ack(self) -> None:
        """The job's final record is written: the message may go."""
        if not self.settled:
            self.message.ack()
            self.settled = True

    def requeue(self) -> None:
        """Put the message back at the end of the queue, for any worker."""
        if not self.settled:
            self.message.reject(requeue=True)
            self.settled = True


class Intake:
    """Takes waiting job messages from the Celery queue; one per pool process, connected lazily."""

    def __init__(self, app: Celery):
        self.app = app
        self._connection: Connection | None = None

    def take(self, limit: int, wait_s: float, *, hand_back: bool = True) -> list[TakenJob]:
        """Up to ``limit`` waiting jobs; waits at most ``wait_s`` for more when the queue runs dry.

        First hands back what an earlier batch left unsettled, unless ``hand_back`` is False:
        a batch taking joiners holds unsettled messages of its own, its running jobs'.
        """
        taken: list[TakenJob] = []
        deadline = time.monotonic() + wait_s
        channel = self._channel()
        if hand_back:
            self.hand_back_unsettled()
        pops = 0
        # Every pop counts, so a message handed straight back (see as_job) cannot keep this looping.
        while pops < limit:
            popped, message = self._get(channel)
            if not popped:
                if time.monotonic() >= deadline:
                    break
                time.sleep(POLL_INTERVAL_S)
                continue
            pops += 1
            job = as_job(message) if message is not None else None
            if job is not None:
                taken.append(job)
        return taken

    def hand_back_unsettled(self) -> None:
        """Put back in the queue every message this process took and has not settled.

        Messages of an earlier batch that could be neither acknowledged nor handed back
        (Redis was down or refused writes, or a take broke off) are still this channel's.
        Every message of a finished batch is settled, so only such orphans remain.
        """
        if self._connection is not None:
            self._channel().qos.restore_unacked()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
            self._connection = None

    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_read()
        return self._connection.default_channel

    def _get(self, channel) -> tuple[bool, Message | None]:
        """Pop the next waiting message (the fair order's), recorded as unacknowledged in the same atomic step.

        Returns whether anything was popped, and the message (None if it was dropped).

        kombu's ``basic_get`` pops, then records, in two round trips: a worker
        killed between them loses the message. Taking happens right after a job
        starts, so the fault suite's kills landed there often enough to lose a job.
        """
        queues = lane_keys(QUEUE_NAME)
        with channel.conn_or_acquire() as client:
            popped = client.eval(_TAKE_SCRIPT, 5 + len(queues), channel.unacked_key, channel.unacked_index_key,
                                 held_key(consumer_id()), LINE_KEY, LINE_SEQ_KEY, *queues, time.time(), FAIR_WINDOW)
        if popped is None:
            return False, None
        raw, recorded_tag = popped
        try:
            message = channel.Message(json.loads(raw), channel=channel)
            if not isinstance(message.delivery_tag, str):
                raise TypeError(f"delivery tag {message.delivery_tag!r} is not a string")
        except UNREADABLE_MESSAGE_ERRORS as err:
            # Not a kombu envelope (a body that does not decode, say); it was already popped, as on
            # Celery's own path (jobqueue.queue.transport). If the script recorded it, unrecord it.
            if recorded_tag:
                channel.qos._remove_from_indices(recorded_tag.decode()).execute()
            log.error("dropped an undecodable message from the queue: %s: %s", type(err).__name__, err)
            return True, None
        if recorded_tag:
            # kombu's in-memory bookkeeping only: the script already wrote the unacked records.
            VirtualQoS.append(channel.qos, message, message.delivery_tag)
        else:
            # JSON that Redis's decoder refuses and Python's reads (a lone surrogate escape in a
            # header): recorded now, in a second step, as kombu's own consumer does.
            channel.qos.append(message, message.delivery_tag)
        return True, message


def as_job(message: Message) -> TakenJob | None:
    """The job in a Celery (protocol 2) message, or None for a message that is not one of ours.

    A message of another task, or with an ETA still ahead (a conversation turn
    told to wait), goes back to the queue for Celery's consumer to handle.
    """
    headers = message.headers or {}
    if headers.get("task") != TASK_NAME or headers.get("eta") or not isinstance(headers.get("id"), str):
        message.reject(requeue=True)
        return None
    try:
        body = message.decode()
        args, kwargs = body[0], dict(body[1])
    except Exception as err:  # recorded as an invalid job message, like Celery's path does
        log.warning("job=%s: undecodable task body: %s", headers["id"], err)
        args, kwargs = [], {"message": None}
    raw_message = kwargs.pop("message", None)
    unexpected = {f"args[{i}]" for i in range(len(args))} | set(kwargs)
    return TakenJob(headers["id"], raw_message, unexpected, message)
