"""The job: sentiment first, then the reply, with every state written to Redis.

``run_job`` turns a Celery message into a sequence of record writes:
``running`` → sentiment known → partial replies → ``succeeded`` (or
``failed`` / ``expired``). When more jobs wait in the queue, the task takes up
to ``BATCH_MAX - 1`` of them (``worker.intake``) and runs them all as one
batch: one sentiment pass, one batched generation, each job's record written
and its message acknowledged on its own.
The engine is loaded once per pool process (``load_engine``), never in the
parent before it forks; the parent only writes ``timed_out`` records when the
hard time limit kills a child.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task
from celery.exceptions import Reject

from producer.protocol import (
    TASK_NAME,
    ErrorCode,
    JobError,
    JobRecord,
    JobStatus,
    Sentiment,
    Turn,
)
from producer.store import JobStore
from worker.admission import RunningJob, TurnNotReady, admit
from worker.intake import Intake
from worker.outcome import finish, save_final, to_ms
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings

if TYPE_CHECKING:  # the engine imports torch: only inside pool processes
    from worker.engine import QwenEngine, ReplyRequest

log = logging.getLogger("qwen_allinone.worker")

#: A later turn of a conversation whose earlier turn still runs is retried after this long.
TURN_RETRY_S = 0.25
#: After a batch of one, a job waits BATCH_WAIT_MS divided by this for others to arrive.
IDLE_WAIT_DIVISOR = 5


class JobTask(Task):
    """Celery task class; records ``timed_out`` when the hard time limit kills the job.

    Celery calls ``on_failure`` in the parent process for a hard time limit, so
    this needs only the store, not the model.
    """

    runtime: WorkerRuntime  # set by register()

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if not isinstance(exc, TimeLimitExceeded):
            return
        store = self.runtime.store
        limit = self.runtime.settings.hard_time_limit_s
        message = f"killed by the hard time limit ({limit:g}s); the worker moved on to the next job"
        try:
            # The jobs taken into the killed batch died with it. Their messages come back
            # after VISIBILITY_TIMEOUT_S and are then skipped, as their records are final.
            for job_id in [task_id, *store.batch_of(task_id)]:
                record = store.get(job_id)
                if record is not None and not record.status.is_final:
                    error = JobError(code=ErrorCode.TIMED_OUT, message=message)
                    save_final(store, finish(record, JobStatus.TIMED_OUT, error))
            store.set_batch(task_id, [], 0)
        except Exception:  # never let bookkeeping break Celery's acknowledgement
            log.exception("job=%s (or a job of its batch) could not be recorded as timed_out", task_id)


def register(app: Celery, runtime: WorkerRuntime) -> Task:
    runtime.intake = Intake(app)

    # max_retries=None: a later turn retries until its earlier turn finishes or it
    # expires (QUEUE_TIMEOUT_S), never into a MaxRetriesExceededError.
    @app.task(name=TASK_NAME, bind=True, base=JobTask, runtime=runtime, max_retries=None)
    def run_job(self: JobTask, *args, **kwargs) -> None:
        # Any arguments are accepted here and checked in admit(), so a malformed
        # message is recorded as failed instead of dying in Celery's argument check.
        message = kwargs.pop("message", None)
        unexpected = {f"args[{i}]" for i in range(len(args))} | set(kwargs)
        try:
            run_batch(self.runtime, self.request.id, message, unexpected, hostname=self.request.hostname or "unknown")
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


def run(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str], hostname: str) -> JobRecord:
    """Run one job alone and return its final record (also written to Redis)."""
    admitted = admit(runtime, job_id, raw_message, unexpected, hostname)
    return admitted if isinstance(admitted, JobRecord) else run_jobs(runtime, [admitted])[0]


def run_batch(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str],
              hostname: str) -> list[JobRecord]:
    """Run the delivered job together with up to BATCH_MAX - 1 jobs already waiting in the queue.

    Each taken message is acknowledged once its job's final record is written;
    whatever is left unsettled when this returns or raises goes back to the queue.
    """
    first = admit(runtime, job_id, raw_message, unexpected, hostname)
    if isinstance(first, JobRecord):
        return [first]
    settings = runtime.settings
    taken = []
    if settings.batch_max > 1:
        # Under load (the last batch had company) clients served together come back
        # together: wait for them. After an idle spell, wait only a fifth of that, long
        # enough for a burst of clients arriving at once, short for a lone client.
        wait_s = settings.batch_wait_ms / 1000 / (1 if runtime.last_batch_size > 1 else IDLE_WAIT_DIVISOR)
        try:
            taken = runtime.intake.take(settings.batch_max - 1, wait_s)
        except Exception as err:  # batching is an optimization: the delivered job runs regardless
            # What was taken before the error stays with the intake, which hands it back next time.
            log.warning("could not take more jobs for a batch: %s: %s", type(err).__name__, err)
    runtime.last_batch_size = 1 + len(taken)
    if taken:
        log.info("job=%s batch: took %s", job_id, " ".join(item.job_id for item in taken))
    try:
        jobs, finished = [first], []
        for item in taken:
            try:
                admitted = admit(runtime, item.job_id, item.raw_message, item.unexpected, hostname)
            except TurnNotReady:
                item.requeue()  # its earlier turn may be in this very batch: after it, not beside it
                continue
            if isinstance(admitted, JobRecord):
                finished.append(admitted)
                item.ack()
            else:
                admitted.taken = item
                jobs.append(admitted)
        if len(jobs) > 1:  # for the parent, should the hard time limit kill this batch
            runtime.store.set_batch(job_id, [job.record.job_id for job in jobs[1:]], settings.visibility_timeout_s)
        return finished + run_jobs(runtime, jobs)
    finally:
        for item in taken:
            if not item.settled:
                try:
                    item.requeue()
                except Exception as err:  # Redis is down: the intake hands it back at its next take
                    log.error("job=%s could not be handed back to the queue yet: %s", item.job_id, err)
        if taken:
            try:
                runtime.store.set_batch(job_id, [], 0)
            except redis.RedisError as err:  # it expires after VISIBILITY_TIMEOUT_S anyway
                log.error("job=%s: could not forget its batch: %s", job_id, err)


def run_jobs(runtime: WorkerRuntime, jobs: list[RunningJob]) -> list[JobRecord]:
    """Run admitted jobs as one batch and finish each; return their final records.

    If the batch as a whole fails, its unfinished jobs run again one by one, so
    one job that breaks the model fails alone.
    """
    store = runtime.store
    try:
        _run_steps(runtime, jobs)
    except redis.RedisError:
        # Redis stayed away through the client's retries: the jobs go back to the queue
        # (the task rejects its message, run_batch hands back the taken ones) rather
        # than fail for an outage.
        raise
    except Exception as err:  # one bad job never takes the worker, or its batch, down
        unfinished = [job for job in jobs if not job.record.status.is_final]
        if len(unfinished) > 1:
            log.warning("a batch of %d jobs failed (%s: %s); running them one by one",
                        len(jobs), type(err).__name__, err)
            for job in unfinished:
                run_jobs(runtime, [job])
        else:
            log.exception("job=%s failed", unfinished[0].record.job_id if unfinished else "-")
            error = JobError(code=ErrorCode.MODEL_ERROR, message=f"{type(err).__name__}: {err}"[:500])
            for job in unfinished:
                job.record.reply = None  # a partial reply is no result
                _settle(store, job, finish(job.record, JobStatus.FAILED, error))
    return [job.record for job in jobs]


def _run_steps(runtime: WorkerRuntime, jobs: list[RunningJob]) -> None:
    engine, store, settings = runtime.load_engine(), runtime.store, runtime.settings
    for job in jobs:
        job.record.model_id = engine.model_id
        job.record.batch_size = len(jobs)

    step = time.perf_counter()
    sentiments = engine.classify_batch([(job.message.request.text, job.message.request.options.labels)
                                        for job in jobs])
    elapsed = to_ms(time.perf_counter() - step)
    replying = []
    for job, sentiment in zip(jobs, sentiments):
        record = job.record
        record.timings.sentiment_ms = elapsed
        if isinstance(sentiment, Exception):  # this job asked for something the model cannot do
            error = JobError(code=ErrorCode.MODEL_ERROR, message=f"{type(sentiment).__name__}: {sentiment}"[:500])
            _settle(store, job, finish(record, JobStatus.FAILED, error))
            continue
        record.sentiment = Sentiment(label=sentiment.label, confidence=sentiment.confidence)
        record.tokens.sentiment_prompt_tokens = sentiment.prompt_tokens
        store.put(record)  # the client can show the sentiment before the reply exists
        replying.append(job)
    if not replying:
        return

    step = time.perf_counter()
    histories = [_history(store, job, settings.history_max_turns) for job in replying]
    elapsed = to_ms(time.perf_counter() - step)
    for job in replying:
        job.record.timings.history_ms = elapsed

    step = time.perf_counter()
    requests = [_reply_request(job, history, settings) for job, history in zip(replying, histories)]
    partial = PartialReplies(store, engine, replying, settings.partial_reply_interval_ms / 1000)
    replies = engine.reply_batch(requests, history_max_tokens=settings.history_max_tokens,
                                 on_step=partial.update if partial.enabled else None)
    elapsed = to_ms(time.perf_counter() - step)
    for job, reply in zip(replying, replies):
        record = job.record
        record.timings.reply_ms = elapsed
        record.reply = reply.text
        record.truncated = reply.truncated
        record.tokens.reply_prompt_tokens = reply.prompt_tokens
        record.tokens.generated_tokens = reply.generated_tokens
        request = job.message.request
        if request.conversation_id:
            # Stored before the record turns final, so a client's next turn always sees it.
            # An empty reply (deadline) is kept too: what the user said is still context.
            turn = Turn(job_id=record.job_id, user=request.text, assistant=reply.text)
            store.append_turn(request.conversation_id, turn, settings.history_max_turns)
        _settle(store, job, finish(record, JobStatus.SUCCEEDED))


def _history(store: JobStore, job: RunningJob, max_turns: int) -> list[tuple[str, str]]:
    conversation_id = job.message.request.conversation_id
    if not conversation_id:
        return []
    return [(turn.user, turn.assistant) for turn in store.load_turns(conversation_id, max_turns)]


def _reply_request(job: RunningJob, history: list[tuple[str, str]], settings: WorkerSettings) -> ReplyRequest:
    from worker.engine import ReplyRequest  # torch: only ever called in a pool process

    options = job.message.request.options
    return ReplyRequest(
        text=job.message.request.text,
        history=history,
        max_new_tokens=options.max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature if options.temperature is None else options.temperature,
        deadline=job.deadline,
        min_new_tokens=options.min_new_tokens or 0,
    )


class PartialReplies:
    """Writes each job's reply-so-far into its record while it is generated, at most every ``interval_s``."""

    def __init__(self, store: JobStore, engine: QwenEngine, jobs: list[RunningJob], interval_s: float):
        self.store, self.engine, self.jobs, self.interval_s = store, engine, jobs, interval_s
        self.enabled = interval_s > 0
        self._next_write = time.monotonic() + interval_s

    def update(self, tokens: list[list[int]]) -> None:
        if time.monotonic() < self._next_write:
            return
        for job, generated in zip(self.jobs, tokens):
            text = self.engine.text_of(generated)
            if text and text != job.record.reply:
                job.record.reply = text
                self.store.put(job.record)
        self._next_write = time.monotonic() + self.interval_s


def _settle(store: JobStore, job: RunningJob, record: JobRecord) -> None:
    """Write the job's final record, then acknowledge the message this process took for it."""
    save_final(store, record)
    if job.taken is not None:
        job.taken.ack()
