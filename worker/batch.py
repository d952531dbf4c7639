"""The batch steps: admitted jobs through the model together, each record written as it goes.

The sentiment of every text (``Engine.classify_batch``), then one batched generation for the jobs
that still stand, with partial replies written while it runs. Each job's
final record is written, and its taken message acknowledged, on its own.
"""

from __future__ import annotations

import logging
import time

import redis

from producer.protocol import ErrorCode, JobError, JobRecord, JobStatus, Sentiment, Turn
from producer.store import JobStore
from worker.admission import RunningJob
from worker.engine import Engine, ReplyRequest
from worker.outcome import finish, save_final, to_ms
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings

log = logging.getLogger("qwen_allinone.worker")


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
        record.sentiment = Sentiment(label=sentiment.label, confidence=sentiment.confidence,
                                     classifier=sentiment.classifier or None)
        record.tokens.sentiment_prompt_tokens = sentiment.prompt_tokens
        if time.time() >= job.deadline:
            # Its deadline passed during the sentiment pass: it fails alone, with its label,
            # rather than take a row of the reply batch that it cannot use.
            error = JobError(code=ErrorCode.TIMED_OUT, message=(
                f"its deadline ({record.timeout_s:g}s, JOB_TIMEOUT_S) passed before the reply could start"))
            _settle(store, job, finish(record, JobStatus.TIMED_OUT, error))
            continue
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
        if request.conversation_scope:
            # Stored before the record turns final, so a client's next turn always sees it.
            # An empty reply (deadline) is kept too: what the user said is still context.
            turn = Turn(job_id=record.job_id, user=request.text, assistant=reply.text)
            store.append_turn(request.conversation_scope, turn, settings.history_max_turns)
        _settle(store, job, finish(record, JobStatus.SUCCEEDED))


def _history(store: JobStore, job: RunningJob, max_turns: int) -> list[tuple[str, str]]:
    conversation_id = job.message.request.conversation_scope
    if not conversation_id:
        return []
    return [(turn.user, turn.assistant) for turn in store.load_turns(conversation_id, max_turns)]


def _reply_request(job: RunningJob, history: list[tuple[str, str]], settings: WorkerSettings) -> ReplyRequest:
    options = job.message.request.options
    # The worker's MAX_NEW_TOKENS caps what a job asks for: one long reply must not hold
    # its whole batch past the others' deadlines.
    return ReplyRequest(
        text=job.message.request.text,
        history=history,
        max_new_tokens=min(options.max_new_tokens or settings.max_new_tokens, settings.max_new_tokens),
        temperature=settings.temperature if options.temperature is None else options.temperature,
        deadline=job.deadline,
        min_new_tokens=options.min_new_tokens or 0,
    )


class PartialReplies:
    """Writes each job's reply-so-far into its record while it is generated, at most every ``interval_s``."""

    def __init__(self, store: JobStore, engine: Engine, jobs: list[RunningJob], interval_s: float):
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
