"""The job: sentiment first, then the reply, with every state written to Redis.

``run_job`` turns a Celery message into a sequence of record writes:
``running`` → sentiment known → ``succeeded`` (or ``failed`` / ``expired``).
The engine is loaded once per pool process (``load_engine``), never in the
parent before it forks; the parent only writes ``timed_out`` records when the
hard time limit kills a child.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task
from celery.exceptions import Reject
from pydantic import ValidationError

from producer.protocol import (
    TASK_NAME,
    ErrorCode,
    JobError,
    JobMessage,
    JobRecord,
    JobStatus,
    Sentiment,
    Timings,
    Turn,
    describe_validation_error,
)
from producer.errors import UnreadableRecord
from producer.store import JobStore, connect_redis
from worker.model_source import ModelSource, resolve_model_source
from worker.settings import WorkerSettings

if TYPE_CHECKING:  # the engine imports torch: only inside pool processes
    from worker.engine import QwenEngine

log = logging.getLogger("qwen_allinone.worker")

#: A job whose worker died this many times while running it is failed, not retried again.
MAX_ATTEMPTS = 3
#: A later turn of a conversation whose earlier turn still runs is retried after this long.
TURN_RETRY_S = 0.25


@dataclass
class WorkerRuntime:
    """What one worker process holds: settings, the Redis store and (in pool processes) the engine."""

    settings: WorkerSettings
    source: ModelSource | None = None
    engine: QwenEngine | None = None
    _store: JobStore | None = field(default=None, repr=False)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            # About 30 s of reconnects: a Redis restart does not fail the running job.
            client = connect_redis(self.settings.redis_url, retries=20, socket_timeout=30)
            self._store = JobStore(client, self.settings.result_ttl_s)
        return self._store

    def resolve_model(self) -> ModelSource:
        if self.source is None:
            self.source = resolve_model_source(self.settings.model)
        return self.source

    def load_engine(self) -> QwenEngine:
        if self.engine is None:
            from worker.engine import QwenEngine  # the only torch import, inside the pool process

            started = time.perf_counter()
            self.engine = QwenEngine.load(
                self.resolve_model(), self.settings.dtype, self.settings.threads,
                prompt_variant=self.settings.classifier_prompt, positive_threshold=self.settings.positive_threshold,
            )
            log.info(
                "model %s loaded (dtype=%s, threads=%d) in %.1fs",
                self.settings.model, self.settings.dtype, self.settings.threads, time.perf_counter() - started,
            )
        return self.engine


class JobTask(Task):
    """Celery task class; records ``timed_out`` when the hard time limit kills the job.

    Celery calls ``on_failure`` in the parent process for a hard time limit, so
    this needs only the store, not the model.
    """

    runtime: WorkerRuntime  # set by register()

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if not isinstance(exc, TimeLimitExceeded):
            return
        try:
            record = self.runtime.store.get(task_id)
            if record is None or record.status.is_final:
                return
            limit = self.runtime.settings.hard_time_limit_s
            message = f"killed by the hard time limit ({limit:g}s); the worker moved on to the next job"
            _save(self.runtime.store, _finish(record, JobStatus.TIMED_OUT, JobError(code=ErrorCode.TIMED_OUT, message=message)))
        except Exception:  # never let bookkeeping break Celery's acknowledgement
            log.exception("job=%s could not be recorded as timed_out", task_id)


def register(app: Celery, runtime: WorkerRuntime) -> Task:
    # max_retries=None: a later turn retries until its earlier turn finishes or it
    # expires (QUEUE_TIMEOUT_S), never into a MaxRetriesExceededError.
    @app.task(name=TASK_NAME, bind=True, base=JobTask, runtime=runtime, max_retries=None)
    def run_job(self: JobTask, *args, **kwargs) -> None:
        # Any arguments are accepted here and checked in run(), so a malformed
        # message is recorded as failed instead of dying in Celery's argument check.
        message = kwargs.pop("message", None)
        unexpected = {f"args[{i}]" for i in range(len(args))} | set(kwargs)
        try:
            run(self.runtime, self.request.id, message, unexpected, hostname=self.request.hostname or "unknown")
        except TurnNotReady as wait:
            # Back to the queue for a moment; the worker serves other jobs meanwhile.
            if not self.request.retries:  # once, not every 0.25 s
                log.info("job=%s waits: %s", self.request.id, wait)
            raise self.retry(countdown=TURN_RETRY_S) from None
        except redis.RedisError as err:
            # Redis is gone even after retries: hand the job back rather than
            # acknowledge it with its record unfinished.
            log.error("job=%s handed back to the queue: Redis error %s", self.request.id, err)
            raise Reject(str(err), requeue=True) from err

    return run_job


class TurnNotReady(Exception):
    """An earlier turn of the same conversation has not finished; run this job later."""


def run(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str], hostname: str) -> JobRecord:
    """Run one job and return its final record (also written to Redis).

    Raises TurnNotReady, without touching the job's record, while an earlier
    turn of the job's conversation is still queued or running.
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
        return _save(store, _finish(record, JobStatus.FAILED, message))

    record = record or JobRecord(
        job_id=job_id,
        status=JobStatus.QUEUED,
        request=message.request,
        submitted_at=message.submitted_at,
        start_by=message.start_by,
        timeout_s=message.timeout_s,
    )
    # The worker's own JOB_TIMEOUT_S caps the job: its hard time limit and the
    # broker's visibility timeout are set from that, not from the producer.
    record.timeout_s = min(message.timeout_s, settings.job_timeout_s)
    # An earlier attempt started and its worker died: run it again from the
    # start, however late (the job was accepted and had begun).
    restarted = record.status is JobStatus.RUNNING
    if not restarted and now > message.start_by:
        waited = now - message.submitted_at
        error = JobError(
            code=ErrorCode.EXPIRED,
            message=f"waited {waited:.0f}s in the queue, past its start deadline; not run (QUEUE_TIMEOUT_S)",
        )
        return _save(store, _finish(record, JobStatus.EXPIRED, error))
    if message.request.conversation_id:
        _check_turn(store, message.request.conversation_id, job_id)

    record.attempts += 1
    record.worker = hostname
    if record.attempts > MAX_ATTEMPTS:
        error = JobError(
            code=ErrorCode.INTERNAL_ERROR,
            message=f"the worker died {record.attempts - 1} times while running this job; not retried again",
        )
        return _save(store, _finish(record, JobStatus.FAILED, error))

    record.status = JobStatus.RUNNING
    record.started_at = now
    record.sentiment, record.reply, record.truncated, record.error = None, None, False, None
    record.timings = Timings(queue_wait_ms=_ms(now - message.submitted_at))
    store.put(record)
    try:
        _run_steps(runtime, record, message, deadline=now + record.timeout_s)
    except Exception as err:  # one bad job never takes the worker down
        log.exception("job=%s failed", job_id)
        code = ErrorCode.INTERNAL_ERROR if isinstance(err, redis.RedisError) else ErrorCode.MODEL_ERROR
        error = JobError(code=code, message=f"{type(err).__name__}: {err}"[:500])
        return _save(store, _finish(record, JobStatus.FAILED, error))
    return _save(store, _finish(record, JobStatus.SUCCEEDED))


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
    """Raise TurnNotReady unless this job is the oldest unfinished turn of its conversation."""
    while (first := store.first_pending_turn(conversation_id)) not in (None, job_id):
        earlier = _load_record(store, first)
        alive = earlier is not None and not earlier.status.is_final and not (
            # Queued past its start deadline: its message is gone or it will expire unrun.
            earlier.status is JobStatus.QUEUED and earlier.start_by is not None and time.time() > earlier.start_by
        )
        if alive:
            raise TurnNotReady(f"job {first} is an earlier turn of conversation {conversation_id}")
        store.remove_pending_turn(conversation_id, first)


def _run_steps(runtime: WorkerRuntime, record: JobRecord, message: JobMessage, deadline: float) -> None:
    engine, store, settings = runtime.load_engine(), runtime.store, runtime.settings
    request = message.request
    record.model_id = engine.model_id

    step = time.perf_counter()
    sentiment = engine.classify(request.text, request.options.labels)
    record.timings.sentiment_ms = _ms(time.perf_counter() - step)
    record.sentiment = Sentiment(label=sentiment.label, confidence=sentiment.confidence)
    record.tokens.sentiment_prompt_tokens = sentiment.prompt_tokens
    store.put(record)  # the client can show the sentiment before the reply exists

    step = time.perf_counter()
    turns = store.load_turns(request.conversation_id, settings.history_max_turns) if request.conversation_id else []
    record.timings.history_ms = _ms(time.perf_counter() - step)

    step = time.perf_counter()
    reply = engine.reply(
        request.text,
        [(turn.user, turn.assistant) for turn in turns],
        max_new_tokens=request.options.max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature if request.options.temperature is None else request.options.temperature,
        deadline=deadline,
        history_max_tokens=settings.history_max_tokens,
        min_new_tokens=request.options.min_new_tokens or 0,
    )
    record.timings.reply_ms = _ms(time.perf_counter() - step)
    record.reply = reply.text
    record.truncated = reply.truncated
    record.tokens.reply_prompt_tokens = reply.prompt_tokens
    record.tokens.generated_tokens = reply.generated_tokens
    if request.conversation_id:
        # Stored before the record turns final, so a client's next turn always sees it.
        # An empty reply (deadline) is kept too: what the user said is still context.
        turn = Turn(job_id=record.job_id, user=request.text, assistant=reply.text)
        store.append_turn(request.conversation_id, turn, settings.history_max_turns)


def _finish(record: JobRecord, status: JobStatus, error: JobError | None = None) -> JobRecord:
    record.status = status
    record.error = error
    record.finished_at = time.time()
    record.timings.total_ms = _ms(record.finished_at - record.submitted_at)
    return record


def _save(store: JobStore, record: JobRecord) -> JobRecord:
    """Write a final record and let the conversation's next turn go."""
    store.put(record)
    if record.request is not None and record.request.conversation_id:
        store.remove_pending_turn(record.request.conversation_id, record.job_id)
    store.record_outcome(record)  # jobs by status and stage latencies, for the gateway's /metrics
    _log_outcome(record)
    return record


def _log_outcome(record: JobRecord) -> None:
    t, n = record.timings, record.tokens
    log.info(
        "job=%s status=%s label=%s confidence=%s queue_ms=%s sentiment_ms=%s reply_ms=%s total_ms=%s "
        "prompt_tokens=%s generated_tokens=%s truncated=%s attempts=%d error=%s",
        record.job_id,
        record.status.value,
        record.sentiment.label if record.sentiment else "-",
        f"{record.sentiment.confidence:.2f}" if record.sentiment else "-",
        _fmt(t.queue_wait_ms), _fmt(t.sentiment_ms), _fmt(t.reply_ms), _fmt(t.total_ms),
        n.reply_prompt_tokens, n.generated_tokens, record.truncated, record.attempts,
        record.error.code.value if record.error else "-",
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"
