"""Every Redis read and write of job records and conversations.

Keys come from ``jobqueue.protocol``; this module is the only place that
touches them. A record is one JSON string written with a single SET, so a
reader sees either the old or the new version, never half of one, and a
record with a final status is never overwritten.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobqueue.callback_hosts import callback_owner
from jobqueue.errors import UnreadableRecord
from jobqueue.metrics_store import JobMetrics, read_metrics
from jobqueue.queue import line
from jobqueue.protocol import (
    DONE_SIGNAL_TTL_S,
    CALLBACK_ATTEMPTS_KEY,
    CALLBACK_LIMITS_KEY,
    CALLBACK_PENDING_KEY,
    CALLBACKS_KEY,
    DEFAULT_CALLBACK_MAX_PENDING,
    FINISHED_RECENTLY_KEY,
    LINE_KEY,
    LINE_LANE_SPAN,
    SERVICE_RATE_WINDOW_S,
    METRICS_JOBS_KEY,
    METRICS_TENANT_JOBS_KEY,
    OPEN_JOBS_KEY,
    UNSENT_JOBS_KEY,
    WRITE_PROBE_KEY,
    ErrorCode,
    JobError,
    JobRecord,
    JobStatus,
    Turn,
    batch_key,
    cancel_key,
    bucket_field,
    conversation_key,
    done_key,
    job_key,
    metrics_counted_key,
    metrics_stage_key,
    open_job_score,
    pending_turns_key,
    runner_key,
    stage_seconds,
)

log = logging.getLogger("qwen_allinone.store")

#: A final record and all its bookkeeping, in one atomic step: the record (unless the stored
#: one is already final: the first final status wins), the done signal that wakes waiting
#: clients, the job's removal from the open jobs and from its conversation's pending turns,
#: and the metrics, counted once per job (the ``counted`` mark). Redis refuses a script under
#: maxmemory at its first write, so it runs whole or not at all.
#: The job's cancel flag goes too, it joins the recently finished jobs (the service rate), and a
#: job with a callback_url joins the callbacks due (not one its client cancelled, unless it asked),
#: while its host and its tenant each have fewer pending than the gateway's caps (then it returns 2).
#: A writer that names its run (``runner``: its consumer id) is refused once the job's run passed
#: to another process (its claim, ``runner:<job_id>``, names that process): a worker cut off for
#: longer than LIVENESS_TTL_S, whose jobs another worker took over, cannot write over their run.
#: KEYS: job, done, open index, pending turns (or ""), counted mark, jobs by status, cancel flag,
#: recently finished, callbacks due, unsent jobs, the run's claim (or ""), callbacks pending,
#: their caps, callback attempts, jobs by tenant and status, stage hashes.
#: ARGV: record JSON, record TTL, done TTL, job id, status, finish time, rate window, the
#: callback's owner ("<host:port>\n<tenant>", or "" for none), ran ('1' or '0': only jobs that ran count towards the service rate),
#: the writer's runner id (or ""), the job's tenant (or ""), then (bucket field, seconds) per stage.
_FINAL_SCRIPT = "local FINAL = {" + ", ".join(f"['{s.value}'] = true" for s in JobStatus if s.is_final) + f"""}}
local DEFAULT_CAP, result = {DEFAULT_CALLBACK_MAX_PENDING}, 1
if KEYS[11] ~= '' then
  local runner = redis.call('GET', KEYS[11])
  if runner and runner ~= ARGV[10] then return 0 end
end
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, old = pcall(cjson.decode, stored)
  if ok and type(old) == 'table' and FINAL[old['status']] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('RPUSH', KEYS[2], 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
if KEYS[4] ~= '' then redis.call('LREM', KEYS[4], 0, ARGV[4]) end
redis.call('DEL', KEYS[7])
redis.call('ZREM', KEYS[10], ARGV[4])
if redis.call('SET', KEYS[5], 1, 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[6], ARGV[5], 1)
  if ARGV[9] == '1' then
    redis.call('ZADD', KEYS[8], ARGV[6], ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', ARGV[6] - ARGV[7])
  end
  if ARGV[8] ~= '' then
    local host, tenant = string.match(ARGV[8], '^([^\\n]*)\\n(.*)$')
    local caps = redis.call('HMGET', KEYS[13], 'host', 'tenant')
    local counts = redis.call('HMGET', KEYS[12], 'host:' .. host, 'tenant:' .. tenant)
    if (tonumber(counts[1]) or 0) < (tonumber(caps[1]) or DEFAULT_CAP)
        and (tonumber(counts[2]) or 0) < (tonumber(caps[2]) or DEFAULT_CAP) then
      redis.call('ZADD', KEYS[9], ARGV[6], ARGV[4])
      redis.call('HINCRBY', KEYS[12], 'host:' .. host, 1)
      redis.call('HINCRBY', KEYS[12], 'tenant:' .. tenant, 1)
      redis.call('HSET', KEYS[14], ARGV[4] .. ':owner', ARGV[8])
    else
      result = 2
    end
  end
  if ARGV[11] ~= '' then redis.call('HINCRBY', KEYS[15], ARGV[5] .. ':' .. ARGV[11], 1) end
  for i = 16, #KEYS do
    local j = 12 + (i - 16) * 2
    redis.call('HINCRBY', KEYS[i], ARGV[j], 1)
    redis.call('HINCRBY', KEYS[i], 'count', 1)
    redis.call('HINCRBYFLOAT', KEYS[i], 'sum', ARGV[j + 1])
  end
end
return result
"""


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


#: Remove a queued job's message from its lane, found through its place in line (``LINE_KEY``,
#: ``jobqueue.queue.line``): its entry's score names its lane, the entries ahead of it in that lane
#: its index from the lane's front, and the message is looked for within ``DROP_WINDOW`` of there
#: (its headers' first "id"; the body is base64, and Celery writes the id before any user text).
#: Work: O(log N) for the index, and the list's own walk to that place for the removal.
#: KEYS: LINE_KEY, then the lanes, highest first. ARGV: job id, LINE_LANE_SPAN, DROP_WINDOW.
#: Returns how many were removed (0: in no lane, or not where the index says; a copy delivered
#: later is skipped, its record being final).
_DROP_MESSAGE_SCRIPT = line.PUSH_LUA + """
line_keys = {KEYS[1], ''}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
line_leave(ARGV[1])
local span, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local lane = math.floor((tonumber(score) + span / 2) / span)
local lane_key = KEYS[2 + lane]
if not lane_key then return 0 end
local ahead = redis.call('ZCOUNT', KEYS[1], string.format('%d', lane * span - span / 2), '(' .. score)
local from = -(ahead + 1) - window
local to = math.min(-(ahead + 1) + window, -1)
for _, item in ipairs(redis.call('LRANGE', lane_key, from, to)) do
  if string.match(item, '"id": "([^"]*)"') == ARGV[1] then return redis.call('LREM', lane_key, -1, item) end
end
return 0
"""
#: How far from where the index places it a cancelled job's message is looked for.
DROP_WINDOW = 8


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s

    # --- job records ---

    def get(self, job_id: str) -> JobRecord | None:
        return _parse(job_id, self.redis.get(job_key(job_id)))

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None | UnreadableRecord]:
        """Several records in one round trip; an unreadable one comes back as its error."""
        if not job_ids:
            return []
        raws = self.redis.mget([job_key(job_id) for job_id in job_ids])
        return [_parse_or_error(job_id, raw) for job_id, raw in zip(job_ids, raws)]

    def put(self, record: JobRecord, runner: str | None = None) -> bool:
        """Write ``record`` unless the stored one is already final; return whether it was written.

        Two writers can race at the end of a job (the hard time limit writes
        ``timed_out`` in the worker's parent while the child may still write);
        the first final status wins. An open record is (re)indexed among the
        open jobs; a final one is written with all of its bookkeeping in one
        step (``_FINAL_SCRIPT``), so a crash never leaves half of it.
        ``runner``: the consumer id of the process whose run this is; the write is
        refused if the job's claim names another process (its run passed on).
        """
        # Neither a watched transaction nor a script is retried by redis-py when the connection
        # drops; both writes are idempotent, so they are retried here, with the client's backoff.
        if record.status.is_final:
            return self._retried(lambda: self._put_final_once(record, runner=runner))
        return self._retried(lambda: self._put_open_once(record, runner))

    def _retried(self, operation):
        """Run ``operation`` under the client's retry policy (connect_redis), if it has one."""
        retry = self.redis.get_retry()
        return operation() if retry is None else retry.call_with_retry(operation, lambda _: None)

    def _put_open_once(self, record: JobRecord, runner: str | None) -> bool:
        key, claim = job_key(record.job_id), runner_key(record.job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key, claim)
                    try:
                        stored = _parse(record.job_id, pipe.get(key))
                    except UnreadableRecord:
                        stored = None  # garbage is replaced, never kept
                    claimed_by = pipe.get(claim) if runner else None
                    if (stored is not None and stored.status.is_final) or (
                            claimed_by is not None and claimed_by.decode() != runner):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(key, record.to_json(), ex=self.ttl_s)
                    pipe.zadd(OPEN_JOBS_KEY, {record.job_id: open_job_score(record)})
                    if record.status is not JobStatus.QUEUED:  # taken by a worker: out of the line
                        line.leave(pipe, record.job_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def _put_final_once(self, record: JobRecord, pipe: redis.client.Pipeline | None = None,
                        runner: str | None = None) -> bool:
        conversation_id = record.request.conversation_scope if record.request else None
        stages = stage_seconds(record.timings)
        keys = [job_key(record.job_id), done_key(record.job_id), OPEN_JOBS_KEY,
                pending_turns_key(conversation_id) if conversation_id else "",
                metrics_counted_key(record.job_id), METRICS_JOBS_KEY, cancel_key(record.job_id),
                FINISHED_RECENTLY_KEY, CALLBACKS_KEY, UNSENT_JOBS_KEY, runner_key(record.job_id) if runner else "",
                CALLBACK_PENDING_KEY, CALLBACK_LIMITS_KEY, CALLBACK_ATTEMPTS_KEY, METRICS_TENANT_JOBS_KEY,
                *(metrics_stage_key(stage) for stage in stages)]
        finished_at = record.finished_at if record.finished_at is not None else time.time()
        args = [record.to_json(), self.ttl_s, DONE_SIGNAL_TTL_S, record.job_id, record.status.value,
                repr(finished_at), repr(SERVICE_RATE_WINDOW_S),
                callback_owner(record),
                "1" if record.started_at is not None else "0", runner or "",
                (record.request.tenant or "") if record.request else "",
                *(item for seconds in stages.values() for item in (bucket_field(seconds), repr(seconds)))]
        if pipe is not None:  # part of the caller's transaction
            pipe.eval(_FINAL_SCRIPT, len(keys), *keys, *args)
            return True
        written = self.redis.eval(_FINAL_SCRIPT, len(keys), *keys, *args)
        if written == 2:
            log.warning("job %s: callback not queued, its host or tenant has the most pending allowed", record.job_id)
        return bool(written)
    # --- cancel ---

    def cancel(self, job_id: str, lanes: list[str]) -> tuple[JobRecord | None, bool]:
        """Cancel a job: its record as it is after the request (None: no such job), and whether
        the request was taken (False for a job already final).

        A queued job is finished ``cancelled`` at once, with the same bookkeeping as any
        final record, and its message leaves the queue's ``lanes`` in the same transaction
        (room under MAX_QUEUE, and the jobs behind it move up). A copy elsewhere (on its way
        to a worker, or redelivered later) is skipped when delivered: it never runs. A running job gets a cancel flag that its
        worker reads between decoding steps; the record returned still says ``running``.
        A final record is returned as it is. The record is watched from the read to the
        write, so a job a worker starts meanwhile is flagged instead.
        """
        key = job_key(job_id)
        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    record = _parse(job_id, pipe.get(key))
                    if record is None or record.status.is_final:
                        return record, False
                    pipe.multi()
                    if record.status is JobStatus.QUEUED:
                        record.finish(JobStatus.CANCELLED, JobError(
                            code=ErrorCode.CANCELLED, message="cancelled by its client before it started"))
                        self._put_final_once(record, pipe)
                        if lanes:  # none when the queue is not in Redis
                            pipe.eval(_DROP_MESSAGE_SCRIPT, 1 + len(lanes), LINE_KEY, *lanes, job_id,
                                      LINE_LANE_SPAN, DROP_WINDOW)
                    else:
                        pipe.set(cancel_key(job_id), 1, ex=self.ttl_s)
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Which of the running ``job_ids`` their clients asked to stop."""
        if not job_ids:
            return set()
        flags = self.redis.mget([cancel_key(job_id) for job_id in job_ids])
        return {job_id for job_id, flag in zip(job_ids, flags) if flag is not None}

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
        self.redis.delete(job_key(job_id))

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
        finished = self.redis.zcount(FINISHED_RECENTLY_KEY, now - SERVICE_RATE_WINDOW_S, "+inf")
        return finished / SERVICE_RATE_WINDOW_S if finished else None

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
        self._retried(lambda: self._append_turn_once(conversation_id, turn, max_turns))

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


def _parse(job_id: str, raw: bytes | None) -> JobRecord | None:
    if raw is None:
        return None
    try:
        return JobRecord.from_json(raw)
    except ValidationError as err:
        raise UnreadableRecord(f"the record of job {job_id} is unreadable: {err.errors()[0]['msg']}") from None



def _parse_or_error(job_id: str, raw: bytes | None) -> JobRecord | None | UnreadableRecord:
    try:
        return _parse(job_id, raw)
    except UnreadableRecord as err:
        return err
