"""Admission: check a delivered job and mark it ``running``, or finish it without the model.

A job is finished here when its record is already final (a redelivered
message), its message is invalid, it waited past its start deadline, or its
worker died too often. A job waits (NotReadyYet) while an earlier turn of its
conversation is unfinished, or while another live process still runs it (a
copy of its message handed back when that process was cut off from Redis).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import (
    ErrorCode,
    JobError,
    JobMessage,
    JobRecord,
    JobStatus,
    describe_validation_error,
)
from jobqueue.store import JobStore
from jobqueue.queue.intake import TakenJob
from jobqueue.queue.liveness import claim_run
from jobqueue.outcome import finish, save_final
from worker.runtime import WorkerRuntime

log = logging.getLogger("qwen_allinone.worker")

#: A job whose worker died this many times while running it is failed, not retried again.
MAX_ATTEMPTS = 3


class NotReadyYet(Exception):
    """An earlier turn of the same conversation has not finished, or the job runs elsewhere; run it later."""


@dataclass
class RunningJob:
    """A job that has been admitted: its record says ``running`` and the model is next."""

    record: JobRecord
    message: JobMessage
    #: Epoch seconds; the reply stops here.
    deadline: float
    #: The queue message this process took for the batch (None for the one Celery delivered).
    taken: TakenJob | None = None


def _expired(waited_s: float) -> JobError:
    return JobError(code=ErrorCode.EXPIRED,
                    message=f"waited {waited_s:.0f}s in the queue, past its start deadline; not run (QUEUE_TIMEOUT_S)")


def admit(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str],
          hostname: str) -> RunningJob | JobRecord:
    """Check a job and mark it ``running``; or finish it without the model and return its final record.

    Raises NotReadyYet, without touching the job's record, while an earlier
    turn of the job's conversation is still queued or running, or while another
    process whose heartbeat is alive runs it.
    """
    store, settings = runtime.store, runtime.settings
    record = _load_record(store, job_id)
    if record is not None and record.status.is_final:
        # A redelivered message whose job already finished: the client has its one result.
        log.info("job=%s already %s, skipping redelivered message", job_id, record.status.value)
        return record

    now = time.time()
    message = _parse_message(raw_message, unexpected, settings.max_input_chars)
    if isinstance(message, JobError):
        record = record or JobRecord(job_id=job_id, status=JobStatus.QUEUED, request=None, submitted_at=now)
        return save_final(store, finish(record, JobStatus.FAILED, message))

    record = record or JobRecord.queued(job_id, message)
    # The worker's own JOB_TIMEOUT_S caps the job: its hard time limit and the
    # broker's visibility timeout are set from that, not from the producer.
    record.time_limit(message.timeout_s, settings.job_timeout_s)
    # An earlier attempt started and its worker died: run it again from the
    # start, however late (the job was accepted and had begun).
    if record.status is not JobStatus.RUNNING and now > message.start_by:
        return save_final(store, finish(record, JobStatus.EXPIRED, _expired(now - message.submitted_at)))
    if message.request.conversation_scope:
        _check_turn(store, message.request.conversation_scope, job_id)

    if runner := claim_run(store.redis, job_id, settings.hard_time_limit_s):
        raise NotReadyYet(f"job {job_id} still runs in process {runner}, which is alive")

    record.taken_by(hostname)
    if record.attempts > MAX_ATTEMPTS:
        error = JobError(
            code=ErrorCode.INTERNAL_ERROR,
            message=f"the worker died {record.attempts - 1} times while running this job; not retried again",
        )
        return save_final(store, finish(record, JobStatus.FAILED, error))

    record.start(now)
    if not store.put(record):
        # It turned final since it was read: cancelled by its client, say. It never runs.
        final = _load_record(store, job_id)
        log.info("job=%s turned %s before it started; not run", job_id, final.status.value if final else "-")
        return final or record
    return RunningJob(record, message, deadline=now + record.timeout_s)


def _load_record(store: JobStore, job_id: str) -> JobRecord | None:
    try:
        return store.get(job_id)
    except UnreadableRecord as err:
        log.warning("job=%s: %s; writing a new one", job_id, err)
        return None


def _parse_message(raw_message, unexpected: set[str], max_input_chars: int) -> JobMessage | JobError:
    if unexpected:
        detail = f"unexpected task arguments: {sorted(unexpected)}"
    else:
        try:
            return JobMessage.model_validate(raw_message, context={"max_input_chars": max_input_chars})
        except ValidationError as err:
            detail = describe_validation_error(err)
    return JobError(code=ErrorCode.INVALID_REQUEST, message=f"invalid job message: {detail}")


def _check_turn(store: JobStore, conversation_id: str, job_id: str) -> None:
    """Raise NotReadyYet unless this job is the oldest unfinished turn of its conversation."""
    while (first := store.first_pending_turn(conversation_id)) not in (None, job_id):
        earlier = _load_record(store, first)
        alive = earlier is not None and not earlier.status.is_final and not (
            # Queued past its start deadline: its message is gone or it will expire unrun.
            earlier.status is JobStatus.QUEUED and earlier.start_by is not None and time.time() > earlier.start_by
        )
        if alive:
            raise NotReadyYet(f"job {first} is an earlier turn of conversation {conversation_id}")
        store.remove_pending_turn(conversation_id, first)
