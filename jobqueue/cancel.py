"""Cancel, in one module: what a client's cancel does to a job, in each of its states.

- **Queued**: the job ends ``cancelled`` at once (``CANCELLED_BEFORE_START``), with the same
  bookkeeping as any final record, and its message leaves the queue's lanes in the same
  transaction (room under MAX_QUEUE, and the jobs behind it move up). A copy elsewhere (on its
  way to a worker, redelivered later, or in RabbitMQ, which cannot be read) is skipped when
  delivered: its record is final, so it never runs.
- **Running**: the job gets a cancel flag (``cancel_key``). Its worker reads the flags of its
  batch between decoding steps (``RunningCancels``, at most every ``POLL_S``) and finishes the
  job ``cancelled`` (``CANCELLED_WHILE_RUNNING``) with its partial reply. The record the client
  gets back still says ``running``. The final record's write removes the flag.
- **Final**: nothing changes; the client is told (``AlreadyFinal``, HTTP 409, CLI exit 6).

The client (``Client.cancel``), the CLI, the gateway (``DELETE /v1/jobs/{id}``) and the worker's
batch call in here; the record itself is written by ``jobqueue.record``.
"""

from __future__ import annotations

import time

import redis

from jobqueue.errors import AlreadyFinal, JobNotFound
from jobqueue.protocol import ErrorCode, JobError, JobRecord, JobStatus, cancel_key, is_job_id
from jobqueue.queue import line
from jobqueue.record import writes
from jobqueue.store import JobStore

CANCELLED_BEFORE_START = JobError(code=ErrorCode.CANCELLED,
                                  message="cancelled by its client before it started")
CANCELLED_WHILE_RUNNING = JobError(code=ErrorCode.CANCELLED, message="cancelled by its client while it ran")
#: A running job's cancel flag is read at most this often (seconds): one MGET for the batch.
POLL_S = 0.25


def cancel(store: JobStore, job_id: str, lanes: list[str]) -> JobRecord:
    """Cancel a job and return its record as it is after the request; ``lanes``: the queue's lanes
    in Redis (none when the queue is in RabbitMQ). Raises JobNotFound for an unknown id, and
    AlreadyFinal (with the record) for a job that had already ended."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id)
    record, accepted = request(store, job_id, lanes)
    if record is None:
        raise JobNotFound(job_id)
    if not accepted:
        raise AlreadyFinal(record)
    return record


def request(store: JobStore, job_id: str, lanes: list[str]) -> tuple[JobRecord | None, bool]:
    """The cancel's one transaction: the record as it is after the request (None: no such job), and
    whether the request was taken (False for a job already final). The record is watched from the
    read to the write, so a job a worker starts meanwhile is flagged instead."""
    while True:
        with store.redis.pipeline(transaction=True) as pipe:
            try:
                record = writes.watch_record(pipe, job_id)
                if record is None or record.status.is_final:
                    return record, False
                pipe.multi()
                if record.status is JobStatus.QUEUED:
                    record.finish(JobStatus.CANCELLED, CANCELLED_BEFORE_START)
                    writes.put_final(store.redis, record, store.ttl_s, pipe)
                    if lanes:
                        line.drop(pipe, job_id, lanes)
                else:
                    pipe.set(cancel_key(job_id), 1, ex=store.ttl_s)
                pipe.execute()
                return record, True
            except redis.WatchError:
                continue


def requested(store: JobStore, job_ids: list[str]) -> set[str]:
    """Which of the running ``job_ids`` their clients asked to stop (one MGET)."""
    if not job_ids:
        return set()
    flags = store.redis.mget([cancel_key(job_id) for job_id in job_ids])
    return {job_id for job_id, flag in zip(job_ids, flags) if flag is not None}


def stopped(record: JobRecord) -> JobRecord:
    """Stamp a running job's record final as its client's cancel stopped it (in place)."""
    return record.finish(JobStatus.CANCELLED, CANCELLED_WHILE_RUNNING)


def describe(job_id: str, record: JobRecord) -> str:
    """One line for the person who asked: done, or (a running job) stopping at its next step."""
    done = record.status is JobStatus.CANCELLED
    return f"job {job_id} {'cancelled' if done else 'stops at its next step (it was running)'}"


class RunningCancels:
    """A batch's reading of its running jobs' cancel flags: at most every ``POLL_S``, one MGET."""

    def __init__(self, store: JobStore):
        self.store = store
        self._next_check = time.monotonic() + POLL_S

    def due(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` to stop now (an empty set between two reads)."""
        now = time.monotonic()
        if now < self._next_check or not job_ids:
            return set()
        self._next_check = now + POLL_S
        return requested(self.store, job_ids)
