"""Every write of a job record, and the reads the writes need.

A record is one JSON string written with a single SET, so a reader sees either the old or
the new version, never half of one, and a record with a final status is never overwritten.
``JobStore.put`` and the cancel (``jobqueue.cancel``) call in here; the submit scripts
write a new record through ``lua.NEW_RECORD_LUA`` with the keys of ``new_record_keys``.
"""

from __future__ import annotations

import logging
import time

import redis
from pydantic import ValidationError

from jobqueue.callback_hosts import callback_owner
from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import (
    CALLBACK_ATTEMPTS_KEY,
    CALLBACK_LIMITS_KEY,
    CALLBACK_PENDING_KEY,
    CALLBACKS_KEY,
    DONE_SIGNAL_TTL_S,
    FINISHED_RECENTLY_KEY,
    METRICS_JOBS_KEY,
    METRICS_TENANT_JOBS_KEY,
    OPEN_JOBS_KEY,
    SERVICE_RATE_WINDOW_S,
    UNSENT_JOBS_KEY,
    JobRecord,
    JobStatus,
    bucket_field,
    cancel_key,
    done_key,
    job_key,
    metrics_counted_key,
    metrics_stage_key,
    open_job_score,
    pending_turns_key,
    runner_key,
    stage_seconds,
)
from jobqueue.queue import line
from jobqueue.record.lua import FINAL_SCRIPT

log = logging.getLogger("qwen_allinone.store")


def new_record_keys(record: JobRecord, claim_key: str | None) -> list[str]:
    """The keys of ``NEW_RECORD_LUA``'s functions, in order: the record, the open jobs, the
    pending turns (or ""), the idempotency claim (or "")."""
    conversation = record.request.conversation_scope if record.request else None
    return [job_key(record.job_id), OPEN_JOBS_KEY, pending_turns_key(conversation) if conversation else "",
            claim_key or ""]


def parse(job_id: str, raw: bytes | None) -> JobRecord | None:
    if raw is None:
        return None
    try:
        return JobRecord.from_json(raw)
    except ValidationError as err:
        raise UnreadableRecord(f"the record of job {job_id} is unreadable: {err.errors()[0]['msg']}") from None


def watch_record(pipe: redis.client.Pipeline, job_id: str) -> JobRecord | None:
    """WATCH the job's record in ``pipe`` and read it (a write of it until EXEC fails the transaction)."""
    key = job_key(job_id)
    pipe.watch(key)
    return parse(job_id, pipe.get(key))


def put(client: redis.Redis, record: JobRecord, ttl_s: int, runner: str | None = None) -> bool:
    """Write ``record`` unless the stored one is already final; return whether it was written.

    Two writers can race at the end of a job (the hard time limit writes
    ``timed_out`` in the worker's parent while the child may still write);
    the first final status wins. An open record is (re)indexed among the
    open jobs; a final one is written with all of its bookkeeping in one
    step (``FINAL_SCRIPT``), so a crash never leaves half of it.
    ``runner``: the consumer id of the process whose run this is; the write is
    refused if the job's claim names another process (its run passed on).
    """
    # Neither a watched transaction nor a script is retried by redis-py when the connection
    # drops; both writes are idempotent, so they are retried here, with the client's backoff.
    if record.status.is_final:
        return retried(client, lambda: put_final(client, record, ttl_s, runner=runner))
    return retried(client, lambda: _put_open_once(client, record, ttl_s, runner))


def retried(client: redis.Redis, operation):
    """Run ``operation`` under the client's retry policy (``store.connect_redis``), if it has one."""
    retry = client.get_retry()
    return operation() if retry is None else retry.call_with_retry(operation, lambda _: None)


def _put_open_once(client: redis.Redis, record: JobRecord, ttl_s: int, runner: str | None) -> bool:
    key, claim = job_key(record.job_id), runner_key(record.job_id)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key, claim)
                try:
                    stored = parse(record.job_id, pipe.get(key))
                except UnreadableRecord:
                    stored = None  # garbage is replaced, never kept
                claimed_by = pipe.get(claim) if runner else None
                if (stored is not None and stored.status.is_final) or (
                        claimed_by is not None and claimed_by.decode() != runner):
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.set(key, record.to_json(), ex=ttl_s)
                pipe.zadd(OPEN_JOBS_KEY, {record.job_id: open_job_score(record)})
                if record.status is not JobStatus.QUEUED:  # taken by a worker: out of the line
                    line.leave(pipe, record.job_id)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def put_final(client: redis.Redis, record: JobRecord, ttl_s: int, pipe: redis.client.Pipeline | None = None,
              runner: str | None = None) -> bool:
    """Write a final record with all of its bookkeeping (``FINAL_SCRIPT``); with ``pipe``, as part of
    the caller's transaction (True then means only "queued in it")."""
    keys, args = _final_keys(record, runner), _final_args(record, ttl_s, runner)
    if pipe is not None:
        pipe.eval(FINAL_SCRIPT, len(keys), *keys, *args)
        return True
    written = client.eval(FINAL_SCRIPT, len(keys), *keys, *args)
    if written == 2:
        log.warning("job %s: callback not queued, its host or tenant has the most pending allowed", record.job_id)
    return bool(written)


def _final_keys(record: JobRecord, runner: str | None) -> list[str]:
    conversation_id = record.request.conversation_scope if record.request else None
    return [job_key(record.job_id), done_key(record.job_id), OPEN_JOBS_KEY,
            pending_turns_key(conversation_id) if conversation_id else "",
            metrics_counted_key(record.job_id), METRICS_JOBS_KEY, cancel_key(record.job_id),
            FINISHED_RECENTLY_KEY, CALLBACKS_KEY, UNSENT_JOBS_KEY, runner_key(record.job_id) if runner else "",
            CALLBACK_PENDING_KEY, CALLBACK_LIMITS_KEY, CALLBACK_ATTEMPTS_KEY, METRICS_TENANT_JOBS_KEY,
            *(metrics_stage_key(stage) for stage in stage_seconds(record.timings))]


def _final_args(record: JobRecord, ttl_s: int, runner: str | None) -> list:
    stages = stage_seconds(record.timings)
    finished_at = record.finished_at if record.finished_at is not None else time.time()
    return [record.to_json(), ttl_s, DONE_SIGNAL_TTL_S, record.job_id, record.status.value,
            repr(finished_at), repr(SERVICE_RATE_WINDOW_S),
            callback_owner(record),
            "1" if record.started_at is not None else "0", runner or "",
            (record.request.tenant or "") if record.request else "",
            *(item for seconds in stages.values() for item in (bucket_field(seconds), repr(seconds)))]


def delete(client: redis.Redis, job_id: str) -> None:
    client.delete(job_key(job_id))

