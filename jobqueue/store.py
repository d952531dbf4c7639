"""The job store: reads of job records, and conversations, batches and metrics in Redis.

A record's every write goes through ``jobqueue.record`` (``put`` and ``delete`` here hand
over to it); a cancel through ``jobqueue.cancel``. Keys come from ``jobqueue.keys``.
"""

from __future__ import annotations

import json

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobqueue.errors import UnreadableRecord
from jobqueue.metrics_store import JobMetrics, read_metrics
from jobqueue.protocol import (
    DONE_SIGNAL_TTL_S,
    FINISHED_RECENTLY_KEY,
    SERVICE_RATE_WINDOW_S,
    WRITE_PROBE_KEY,
    JobRecord,
    Turn,
    batch_key,
    conversation_key,
    done_key,
    job_key,
    pending_turns_key,
)
from jobqueue.record import writes


def connect_redis(url: str, *, retries: int, socket_timeout: float) -> redis.Redis:
    """A Redis client that retries a refused or dropped connection ``retries`` times with backoff.

    Producers want few retries (a clear BrokerUnavailable quickly); workers want
    many, so a Redis restart does not fail the job that is running.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(5, socket_timeout),
        socket_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError],
    )


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s

    # --- job records ---

    def get(self, job_id: str) -> JobRecord | None:
        return writes.parse(job_id, self.redis.get(job_key(job_id)))

    def get_with_place(self, job_id: str, line_index: str | None,
                       now: float) -> tuple[JobRecord | None, int | None, float | None]:
        """The record, the job's place in line (1 = next; None when it is in no lane) and
        ``service_rate``, in one round trip: a client's read of one job, at any depth of the queue.
        ``line_index``: the broker's place-in-line sorted set (``jobqueue.queue.line``; None on
        RabbitMQ, which has none), where the place is the job's rank + 1, O(log N)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(job_key(job_id))
            _count_finished_recently(pipe, now)
            if line_index:
                pipe.zrank(line_index, job_id)
            raw, finished, *rank = pipe.execute()
        place = rank[0] + 1 if rank and rank[0] is not None else None
        return writes.parse(job_id, raw), place, _rate(finished)

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None | UnreadableRecord]:
        """Several records in one round trip; an unreadable one comes back as its error."""
        if not job_ids:
            return []
        raws = self.redis.mget([job_key(job_id) for job_id in job_ids])
        return [_parse_or_error(job_id, raw) for job_id, raw in zip(job_ids, raws)]

    def put(self, record: JobRecord, runner: str | None = None) -> bool:
        """Write ``record`` unless the stored one is already final; whether it was written
        (``jobqueue.record.writes.put``: the first final status wins, with all its bookkeeping)."""
        return writes.put(self.redis, record, self.ttl_s, runner)

    def wait_until_final(self, job_id: str, timeout_s: float) -> bool:
        """Block until the job's record turns final or ``timeout_s`` passes; True if it did.

        The signal is put back for any other client waiting on the same job.
        """
        key = done_key(job_id)
        if self.redis.blpop([key], timeout=timeout_s) is None:
            return False
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, 1).expire(key, DONE_SIGNAL_TTL_S).execute()
        return True

    def delete(self, job_id: str) -> None:
        writes.delete(self.redis, job_id)

    def probe_writes(self) -> None:
        """Raise Redis's error unless it takes a write now (OOM, READONLY and MISCONF refuse)."""
        self.redis.set(WRITE_PROBE_KEY, 1, ex=DONE_SIGNAL_TTL_S)

    # --- queue ---

    def queue_depth(self, lanes: list[str]) -> int:
        """Messages waiting in the queue's ``lanes`` (its Redis lists), not counting running jobs."""
        with self.redis.pipeline(transaction=False) as pipe:
            for lane in lanes:
                pipe.llen(lane)
            return sum(pipe.execute())

    def service_rate(self, now: float) -> float | None:
        """Jobs finished per second over the last SERVICE_RATE_WINDOW_S; None if none finished."""
        return _rate(_count_finished_recently(self.redis, now))

    # --- conversations ---

    def load_turns(self, conversation_id: str, max_turns: int) -> list[Turn]:
        if max_turns <= 0:
            return []
        raw = self.redis.lrange(conversation_key(conversation_id), -max_turns, -1)
        return [Turn.model_validate_json(item) for item in raw]

    def append_turn(self, conversation_id: str, turn: Turn, max_turns: int) -> None:
        """Append ``turn`` once: a retried or redelivered job does not store its turn twice."""
        if max_turns <= 0:
            return
        # Retried on a dropped connection like put(): appending once is idempotent.
        writes.retried(self.redis, lambda: self._append_turn_once(conversation_id, turn, max_turns))

    def _append_turn_once(self, conversation_id: str, turn: Turn, max_turns: int) -> None:
        key = conversation_key(conversation_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    last = pipe.lindex(key, -1)
                    if last is not None and Turn.model_validate_json(last).job_id == turn.job_id:
                        pipe.unwatch()
                        return
                    pipe.multi()
                    pipe.rpush(key, turn.model_dump_json())
                    pipe.ltrim(key, -max_turns, -1)
                    pipe.expire(key, self.ttl_s)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue


    # --- per-conversation order: a turn runs only after the earlier ones finished ---

    def push_pending_turn(self, conversation_id: str, job_id: str) -> None:
        key = pending_turns_key(conversation_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, job_id)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def first_pending_turn(self, conversation_id: str) -> str | None:
        first = self.redis.lindex(pending_turns_key(conversation_id), 0)
        return None if first is None else first.decode()

    def remove_pending_turn(self, conversation_id: str, job_id: str) -> None:
        self.redis.lrem(pending_turns_key(conversation_id), 0, job_id)

    # --- batches: which jobs run with a delivered one, for the hard time limit's bookkeeping ---

    def set_batch(self, job_id: str, pool_pid: int, taken_ids: list[str], ttl_s: int) -> None:
        """Record the pool process running ``job_id``'s batch and the jobs it took into it."""
        key = batch_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"pid": pool_pid, "taken": json.dumps(taken_ids)})
            pipe.expire(key, ttl_s)
            pipe.execute()

    def forget_batch(self, job_id: str) -> None:
        self.redis.delete(batch_key(job_id))

    def batch_of(self, job_id: str) -> tuple[int | None, list[str]]:
        """The pool process's pid (None if unknown) and the taken jobs' ids."""
        fields = self.redis.hgetall(batch_key(job_id))
        if not fields:
            return None, []
        return int(fields[b"pid"]), json.loads(fields[b"taken"])

    # --- metrics: every final record is counted once, in the same step that writes it ---

    def read_metrics(self) -> JobMetrics:
        """Every job counter, cache counter and stage histogram, read in one round trip."""
        return read_metrics(self.redis)


def _count_finished_recently(client: redis.Redis | redis.client.Pipeline, now: float):
    """ZCOUNT of the jobs finished over the last SERVICE_RATE_WINDOW_S (on a pipeline: queued)."""
    return client.zcount(FINISHED_RECENTLY_KEY, now - SERVICE_RATE_WINDOW_S, "+inf")


def _rate(finished: int) -> float | None:
    """Jobs per second from the count finished over the last SERVICE_RATE_WINDOW_S; None for none."""
    return finished / SERVICE_RATE_WINDOW_S if finished else None


def _parse_or_error(job_id: str, raw: bytes | None) -> JobRecord | None | UnreadableRecord:
    try:
        return writes.parse(job_id, raw)
    except UnreadableRecord as err:
        return err
