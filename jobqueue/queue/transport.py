"""Kombu's Redis transport with four changes, selected by Celery's ``broker_transport``.

1. Undecodable messages. Anyone who can write to Redis can push bytes that
   are not a kombu envelope, or an envelope Celery cannot read (no task id).
   Stock kombu raises and the worker stops with "Unrecoverable error"; this
   channel logs and drops such a message and goes on. One that kombu had
   already recorded as unacknowledged is acknowledged as it is dropped, so it
   is not left held by a live process for ever.
2. Liveness. A message recorded as unacknowledged is added, in the same
   pipeline, to the ``held`` set of the process holding it, and removed with
   it (``jobqueue.queue.liveness``); the reconciler reads those sets.
3. Atomic admission. A job published inside ``submission.admitting`` is
   written by one script: the depth check, its record, its open-job entry,
   its conversation's pending turn and the message itself
   (``jobqueue.queue.submission``). Every push and pop of a job message keeps its place in
   line in the same step (``jobqueue.queue.line``).
4. A Redis that refuses writes (OOM at maxmemory, READONLY, MISCONF) does not
   stop Celery's consumer with "Unrecoverable error". An acknowledgement or a
   hand-back it refuses is done in memory now and in Redis at the next step
   (the record stays meanwhile, so nothing is lost); a delivered message it
   refuses to record is dropped, and the reconciler re-sends its open job.

``REDIS_URL`` stays a plain ``redis://`` URL.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from time import time

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import dumps

from jobqueue.protocol import held_key
from jobqueue.queue import line, submission
from jobqueue.queue.liveness import consumer_id

log = logging.getLogger("qwen_allinone.worker")


def lane_keys(queue: str) -> list[str]:
    """The queue's Redis lists, highest priority first, without a connection: named as kombu's
    Redis channel names them (``Channel._q_for_pri`` with its default priority steps)."""
    return [queue if step == 0 else f"{queue}{kombu_redis.Channel.sep}{step}" for step in kombu_redis.PRIORITY_STEPS]


#: What decoding a message that is not a (Celery) envelope raises, in kombu or in Celery's strategy.
UNREADABLE_MESSAGE_ERRORS = (ValueError, KeyError, TypeError)


class NotRecorded(Exception):
    """Redis refused to record a delivered message as unacknowledged (OOM, READONLY, MISCONF)."""


#: Every QoS of this process (Celery's consumer's, the batch intake's): what it holds in memory.
_every_qos: weakref.WeakSet[QoS] = weakref.WeakSet()


def held_in_memory() -> set[str]:
    """The delivery tags this process holds: delivered and unsettled on an open channel, or settled
    in memory with Redis yet to catch up. A closed channel's tags cannot be settled through it any
    more (a connection loss closes it, and its hand-back may have failed with Redis down)."""
    while True:
        try:
            return {tag for qos in list(_every_qos) if not qos.channel.closed
                    for tags in (qos._delivered, qos._unsettled_in_redis, qos._unrestored) for tag in list(tags)}
        except RuntimeError:  # changed size while read from the heartbeat's thread: read again
            continue


class QoS(kombu_redis.QoS):
    #: The tag last recorded as unacknowledged (see Channel._brpop_read).
    last_appended: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _every_qos.add(self)
        #: Tags settled in memory whose Redis records could not be removed, or handed back to the
        #: queue, yet (Redis refused writes); kept in Redis meanwhile, so nothing is lost.
        self._unsettled_in_redis: set[str] = set()
        self._unrestored: set[str] = set()

    def append(self, message, delivery_tag):
        # kombu's own append, plus the held set, in one pipeline (one MULTI).
        self._settle_leftovers()
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        job_id = _job_id_of(message.headers)
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}) \
                    .hset(self.unacked_key, delivery_tag, entry) \
                    .sadd(held_key(consumer_id()), delivery_tag)
                if job_id is not None:  # it left the line, and its tenant's
                    line.leave(pipe, job_id)
                pipe.execute()
        except redis.ResponseError as err:
            raise NotRecorded(str(err)) from err
        VirtualQoS.append(self, message, delivery_tag)
        self.last_appended = delivery_tag

    def ack(self, delivery_tag):
        # A refused write must not stop Celery's consumer (it would exit with "Unrecoverable
        # error"): the message is settled in memory now, in Redis at the next chance.
        self._settle_leftovers()
        try:
            self._remove_from_indices(delivery_tag).execute()
        except redis.ResponseError as err:
            log.warning("message %s: acknowledged, but Redis refused to drop its record (%s); retried later",
                        delivery_tag, err)
            self._unsettled_in_redis.add(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def restore_unacked(self, client=None):
        # kombu's Redis QoS restores every tag it ever delivered, settled ones included (it
        # skips the in-memory flush that the base class does). A settled message that went
        # back to the queue and was taken again, by Celery's consumer say, would then be
        # pushed to the queue a second time, and run twice. Forget the settled tags first.
        self._flush()
        return super().restore_unacked(client)

    def reject(self, delivery_tag, requeue=False):
        if not requeue:
            return self.ack(delivery_tag)
        self._settle_leftovers()
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except redis.ResponseError as err:
            log.warning("message %s: not handed back yet, Redis refused (%s); retried later", delivery_tag, err)
            self._unrestored.add(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def _settle_leftovers(self) -> None:
        """Finish in Redis what a refused write left undone (before this process's next step)."""
        for tags, settle in ((self._unsettled_in_redis, lambda tag: self._remove_from_indices(tag).execute()),
                             (self._unrestored, lambda tag: self.restore_by_tag(tag, leftmost=True))):
            for tag in list(tags):
                try:
                    settle(tag)
                except redis.ResponseError:
                    return  # still refused: next time
                tags.discard(tag)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        # Every path that settles a message (ack, reject, restore) comes through here.
        return super()._remove_from_indices(delivery_tag, pipe).srem(held_key(consumer_id()), delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options):
        self.qos.last_appended = None
        try:
            return super()._brpop_read(**options)
        except NotRecorded as err:
            # Popped, but Redis refuses writes: it cannot be held. Its job is open and in no
            # queue, so the reconciler re-sends it once Redis takes writes again.
            log.error("a delivered message could not be recorded (Redis refuses writes: %s); the reconciler "
                      "re-sends its job", err)
            return True
        except UNREADABLE_MESSAGE_ERRORS as err:
            # JSON that does not decode, or decodes to something that is not an envelope.
            tag = self.qos.last_appended
            if tag is not None and tag in self.qos._delivered:
                # Recorded before Celery failed to read it: settle it, or it stays held by this live process.
                self.qos.reject(tag, requeue=False)
            log.error("dropped an undecodable message from the queue: %s: %s", type(err).__name__, err)
            return True

    def _put(self, queue, message, **kwargs):
        plan = submission.current_plan()
        lanes = lane_keys(queue)
        target = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        if plan is None and (kwargs.get("_publish_batch") is not None or self._expires or target not in lanes):
            return super()._put(queue, message, **kwargs)  # not a publish of ours (no batches, no expiry)
        with self.conn_or_acquire() as client:
            if plan is not None:
                plan.run(client, target, lanes, dumps(message))
            else:  # a re-send, Celery's retry: at the back of its lane, with its place in line
                line.push(client, target, lanes.index(target), dumps(message),
                          _job_id_of(message.get("headers")), front=False)

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        # kombu's hand-back (a reject with requeue, a restore of unacked messages), with the place
        # in line kept in the same transaction: leftmost is the back of the lane, else the front.
        try:
            with contextlib.suppress(KeyError, TypeError):
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            priority = self._get_message_priority(payload, reverse=False)
            for queue in self._lookup(exchange, routing_key):
                lane, lanes = self._q_for_pri(queue, priority), lane_keys(queue)
                line.push(pipe, lane, lanes.index(lane), dumps(payload),
                          _job_id_of(payload.get("headers")), front=not leftmost)
        except self.connection_errors:
            raise  # aborts the transaction, which would otherwise drop the message from unacked
        except Exception:
            log.critical("could not hand back message %r", payload, exc_info=True)


def _job_id_of(headers) -> str | None:
    """A Celery message's job id (its task id), from its headers; None for one that has none."""
    job_id = headers.get("id") if isinstance(headers, dict) else None
    return job_id if isinstance(job_id, str) else None


class Transport(kombu_redis.Transport):
    Channel = Channel
