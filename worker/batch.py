"""The batch steps: admitted jobs through the model together, each record written as it goes.

The sentiment of every text (``Engine.classify_batch``), then one decoding
session (``Engine.open_replies``) for the jobs that still stand, with partial
replies written while it runs. Jobs that join the batch while it decodes
(``worker.joining``) get their sentiment pass, then a free row of the session.
Each job's final record is written, and its taken message acknowledged, on
its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from jobqueue import cancel
from jobqueue.protocol import ErrorCode, FlaggedSpan, JobError, JobRecord, JobStatus, Sentiment, Turn
from jobqueue.store import JobStore
from worker.admission import RunningJob
from worker.cache import CachedReply, ResultCache
from worker.engine import Engine, ReplyRequest, ReplyResult, SentimentResult, StopReason
from worker.engine.session import PREFILL_CHUNK_TOKENS
from jobqueue.outcome import finish, save_final, to_ms
from worker.engine.prompts import reply_mood
from jobqueue.queue.liveness import consumer_id
from worker.runtime import WorkerRuntime
from worker.safety import SafetyFilter
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.engine.session import ReplySession
    from worker.joining import Joiners

log = logging.getLogger("qwen_allinone.worker")

#: (text, label set) pairs -> each one's sentiment, or the error of a set the model cannot answer.
Classify = Callable[[list[tuple[str, str]]], list[SentimentResult | ValueError]]


def run_jobs(runtime: WorkerRuntime, jobs: list[RunningJob], joiners: Joiners | None = None) -> list[JobRecord]:
    """Run admitted jobs as one batch and finish each; return their final records.

    ``joiners`` takes waiting jobs into the batch's free rows while it decodes;
    they are appended to ``jobs``. If the batch as a whole fails, its unfinished
    jobs run again one by one, so one job that breaks the model fails alone.
    """
    store = runtime.store
    try:
        _run_steps(runtime, jobs, joiners)
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
                job.record.reply_so_far(None)  # a partial reply is no result
                _settle(store, job, finish(job.record, JobStatus.FAILED, error))
    return [job.record for job in jobs]


def _run_steps(runtime: WorkerRuntime, jobs: list[RunningJob], joiners: Joiners | None) -> None:
    engine = runtime.load_engine()
    for job in jobs:
        job.record.in_batch_of(len(jobs))
    replying = _prepare_replies(runtime, engine, jobs)
    if replying:
        _decode(runtime, engine, replying, jobs, joiners)


def _prepare_replies(runtime: WorkerRuntime, engine: Engine, jobs: list[RunningJob],
                     classify: Classify | None = None) -> list[PendingReply]:
    """Sentiment, then everything short of generating: the jobs whose reply the model must write.

    ``classify`` runs the model's sentiment pass (default: ``engine.classify_batch``)."""
    for job in jobs:
        job.record.on_model(engine.model_id)
    labelled = _sentiment_step(runtime, engine, jobs, classify or engine.classify_batch)
    replying = _drop_cancelled(runtime.store, labelled)
    replying = _refuse_flagged_input(runtime, replying)
    return _replies_not_cached(runtime, engine, replying) if replying else []


def _refuse_flagged_input(runtime: WorkerRuntime, jobs: list[RunningJob]) -> list[RunningJob]:
    """Finish the jobs whose text holds a listed term with SAFETY_MESSAGE, unanswered; return the rest."""
    if runtime.safety is None:
        return jobs
    rest = []
    for job in jobs:
        spans = runtime.safety.spans(job.message.request.text)
        if not spans:
            rest.append(job)
            continue
        job.record.input_flagged([FlaggedSpan(term=t, start=a, end=b) for t, a, b in spans])
        _finish_reply(runtime, job, CachedReply(runtime.settings.safety_message, 0, 0), reply_ms=0.0)
    return rest


def _sentiment_step(runtime: WorkerRuntime, engine: Engine, jobs: list[RunningJob],
                    classify: Classify) -> list[RunningJob]:
    """Every job's sentiment (from the cache, or one pass for the rest); returns the jobs to reply to."""
    store = runtime.store
    step = time.perf_counter()
    sentiments = _sentiments(runtime, engine, jobs, classify)
    elapsed = to_ms(time.perf_counter() - step)
    replying = []
    for job, sentiment in zip(jobs, sentiments):
        record = job.record
        if isinstance(sentiment, Exception):  # this job asked for something the model cannot do
            error = JobError(code=ErrorCode.MODEL_ERROR, message=f"{type(sentiment).__name__}: {sentiment}"[:500])
            _settle(store, job, finish(record, JobStatus.FAILED, error))
            continue
        record.labelled(sentiment, elapsed)
        if time.time() >= job.deadline:
            # Its deadline passed during the sentiment pass: it fails alone, with its label,
            # rather than take a row of the reply batch that it cannot use.
            error = JobError(code=ErrorCode.TIMED_OUT, message=(
                f"its deadline ({record.timeout_s:g}s, JOB_TIMEOUT_S) passed before the reply could start"))
            _settle(store, job, finish(record, JobStatus.TIMED_OUT, error))
            continue
        store.put(record, runner=consumer_id())  # the client can show the sentiment before the reply
        replying.append(job)
    return replying


def _sentiments(runtime: WorkerRuntime, engine: Engine, jobs: list[RunningJob],
                classify: Classify) -> list[Sentiment | Exception]:
    """Cached sentiments, and one model pass for the jobs the cache does not know (none: no pass)."""
    items = [(job.message.request.text, job.message.request.options.labels) for job in jobs]
    digests = [runtime.cache.digest(job.message.request.tenant, "sentiment", text, labels,
                                    engine.classifier_id(labels), engine.model_id, engine.dtype_name,
                                    runtime.settings.positive_threshold) for job, (text, labels) in zip(jobs, items)]
    found: list[Sentiment | Exception | None] = list(runtime.cache.sentiments(digests))
    missing = [i for i, sentiment in enumerate(found) if sentiment is None]
    results = classify([items[i] for i in missing]) if missing else []
    fresh = {}
    for i, result in zip(missing, results):
        if isinstance(result, Exception):
            found[i] = result
            continue
        found[i] = Sentiment(label=result.label, confidence=result.confidence, classifier=result.classifier or None)
        jobs[i].record.tokens.sentiment_prompt_tokens = result.prompt_tokens
        fresh[digests[i]] = found[i]
    runtime.cache.store_sentiments(fresh)
    return found


@dataclass
class PendingReply:
    """A job whose reply the model writes: the request, and its cache key (None: not cached)."""

    job: RunningJob
    request: ReplyRequest
    digest: str | None


def _replies_not_cached(runtime: WorkerRuntime, engine: Engine, replying: list[RunningJob]) -> list[PendingReply]:
    """Finish the jobs whose reply is in the cache; the requests of the rest."""
    settings = runtime.settings
    step = time.perf_counter()
    histories = [_history(runtime.store, job, settings.history_max_turns) for job in replying]
    elapsed = to_ms(time.perf_counter() - step)
    pending = []
    for job, history in zip(replying, histories):
        job.record.timings.history_ms = elapsed
        request = _reply_request(job, history, settings)
        pending.append(PendingReply(job, request, _reply_digest(runtime.cache, engine, job, request)))
    digests = [p.digest for p in pending if p.digest is not None]
    hits = dict(zip(digests, runtime.cache.replies(digests)))
    for p in pending:  # a cache hit costs no model pass
        if hits.get(p.digest) is not None:
            _finish_reply(runtime, p.job, hits[p.digest], reply_ms=0.0, cached=True)
    return [p for p in pending if hits.get(p.digest) is None]


def _decode(runtime: WorkerRuntime, engine: Engine, pending: list[PendingReply], jobs: list[RunningJob],
            joiners: Joiners | None) -> None:
    """Generate the replies in one session; while it runs, jobs that join get its free rows."""
    settings = runtime.settings
    with engine.open_replies(settings.batch_max, history_max_tokens=settings.history_max_tokens) as session:
        rows = DecodingRows(runtime, engine, session)
        waiting = rows.start(pending)
        while waiting or len(session):
            rows.step()
            waiting = rows.start(waiting)
            if joiners is not None and not waiting and session.free_rows and joiners.due():
                joined = joiners.take(session.free_rows)
                for job in joined:
                    job.record.in_batch_of(len(session) + len(joined))
                jobs.extend(joined)
                try:
                    waiting = rows.start(_prepare_joiners(runtime, engine, joined, rows))
                except _RunningRowsFailed as failed:
                    raise failed.__cause__ from None  # the batch fails as a whole: run_jobs reruns it


def _prepare_joiners(runtime: WorkerRuntime, engine: Engine, joined: list[RunningJob],
                     rows: DecodingRows) -> list[PendingReply]:
    """``_prepare_replies`` for jobs joining a running batch. Their sentiment is read in chunks with a
    decoding step of the running rows between them, so a long text does not stall those rows for
    its whole prompt. One that breaks the model fails alone, and the running rows go on (they never
    run again for a joiner's fault)."""

    def classify_between_steps(items):
        with engine.classify_in_chunks(items, PREFILL_CHUNK_TOKENS, beside=rows.session) as sentiment:
            while not sentiment.advance():
                try:
                    rows.step()
                except Exception as err:  # the running rows' fault, not the joiners'
                    raise _RunningRowsFailed() from err
        return sentiment.results

    try:
        return _prepare_replies(runtime, engine, joined, classify_between_steps)
    except (redis.RedisError, _RunningRowsFailed):
        raise
    except Exception as err:
        unfinished = [job for job in joined if not job.record.status.is_final]
        if len(unfinished) > 1:
            log.warning("the sentiment pass of %d joining jobs failed (%s: %s); preparing them one by one",
                        len(unfinished), type(err).__name__, err)
            return [reply for job in unfinished for reply in _prepare_joiners(runtime, engine, [job], rows)]
        if not unfinished:
            return []
        job = unfinished[0]
        log.exception("job=%s failed", job.record.job_id)
        error = JobError(code=ErrorCode.MODEL_ERROR, message=f"{type(err).__name__}: {err}"[:500])
        _settle(runtime.store, job, finish(job.record, JobStatus.FAILED, error))
        return []


class _RunningRowsFailed(Exception):
    """A decoding step of the running rows failed while a joiner's sentiment was read."""


class DecodingRows:
    """The jobs whose replies a session generates: started as rows free up, finished as rows end."""

    def __init__(self, runtime: WorkerRuntime, engine: Engine, session: ReplySession):
        self.runtime, self.engine, self.session = runtime, engine, session
        self.running: dict[int, tuple[PendingReply, float]] = {}  # key -> (reply, perf_counter at start)
        self.updates = StepUpdates(runtime.store, engine, runtime.settings.partial_reply_interval_ms / 1000,
                                   runtime.safety)

    def start(self, pending: list[PendingReply]) -> list[PendingReply]:
        """Start what fits now, in order; the rest waits for a free row (or cache)."""
        for index, reply in enumerate(pending):
            try:
                key = self.session.add(reply.request)
            except ValueError as err:  # more cache than the whole worker holds: it fails alone
                error = JobError(code=ErrorCode.MODEL_ERROR, message=str(err)[:500])
                _settle(self.runtime.store, reply.job, finish(reply.job.record, JobStatus.FAILED, error))
                continue
            if key is None:
                return pending[index:]
            self.running[key] = (reply, time.perf_counter())
        return []

    def step(self) -> None:
        """One decoding step: finish the replies that ended, then write partials and read cancels."""
        fresh = {}
        for key, result in self.session.step():
            reply, started = self.running.pop(key)
            _finish_reply(self.runtime, reply.job, result, reply_ms=to_ms(time.perf_counter() - started),
                          cancelled=result.stop_reason is StopReason.CANCELLED)
            if reply.digest is not None and result.stop_reason in (StopReason.EOS, StopReason.LENGTH):
                fresh[reply.digest] = CachedReply(result.text, result.prompt_tokens, result.generated_tokens,
                                                  result.stop_reason.value)
        if fresh:
            self.runtime.cache.store_replies(fresh)
        jobs = {key: reply.job for key, (reply, _) in self.running.items()}
        for key in self.updates.update(jobs, self.session):
            self.session.cancel(key)


def _reply_digest(cache: ResultCache, engine: Engine, job: RunningJob, request: ReplyRequest) -> str | None:
    """The cache key of a reply as determined as a sentiment: greedy, with no history; else None."""
    if request.temperature > 0 or request.history:
        return None
    return cache.digest(job.message.request.tenant, "reply", request.text, request.max_new_tokens,
                        request.min_new_tokens, request.mood,
                        engine.model_id, engine.dtype_name)


def _finish_reply(runtime: WorkerRuntime, job: RunningJob, reply: ReplyResult | CachedReply, *, reply_ms: float,
                  cached: bool = False, cancelled: bool = False) -> None:
    store, record = runtime.store, job.record
    stop_reason = reply.stop_reason if isinstance(reply, CachedReply) else reply.stop_reason.value
    record.reply_ended(reply.text, reply_ms=reply_ms, truncated=reply.truncated, stop_reason=stop_reason,
                       cached=cached, prompt_tokens=reply.prompt_tokens, generated_tokens=reply.generated_tokens)
    if runtime.safety is not None and (terms := runtime.safety.find(reply.text)):
        record.reply_withheld(terms, runtime.settings.safety_message)
    elif runtime.safety is not None and (cancelled or reply.truncated):
        record.reply_so_far(runtime.safety.safe_prefix(reply.text))  # a cut reply may end with a term's start
    if cancelled:  # the partial reply stays; no turn is stored
        _settle(store, job, cancel.stopped(record))
        return
    request = job.message.request
    # A flagged text is not history: the next turn's prompt never carries it.
    if request.conversation_scope and not (record.flagged and record.flagged.input):
        # Stored before the record turns final, so a client's next turn always sees it.
        # An empty reply (deadline) is kept too: what the user said is still context.
        turn = Turn(job_id=record.job_id, user=request.text, assistant=record.reply)
        store.append_turn(request.conversation_scope, turn, runtime.settings.history_max_turns)
    _settle(store, job, finish(record, JobStatus.SUCCEEDED))


def _history(store: JobStore, job: RunningJob, max_turns: int) -> list[tuple[str, str]]:
    """The reply's earlier turns: those the client sent with the job, or its stored conversation's."""
    if job.message.request.history is not None:  # never both (JobRequest.history)
        turns = [(turn.user, turn.assistant) for turn in job.message.request.history]
        return turns[-max_turns:] if max_turns > 0 else []
    conversation_id = job.message.request.conversation_scope
    if not conversation_id:
        return []
    return [(turn.user, turn.assistant) for turn in store.load_turns(conversation_id, max_turns)]


def _reply_request(job: RunningJob, history: list[tuple[str, str]], settings: WorkerSettings) -> ReplyRequest:
    options = job.message.request.options
    sentiment = job.record.sentiment
    mood = reply_mood(options.labels, sentiment.label, sentiment.confidence) if sentiment else "neutral"
    # The worker's MAX_NEW_TOKENS caps what a job asks for: one long reply must not hold
    # its whole batch past the others' deadlines.
    return ReplyRequest(
        text=job.message.request.text,
        history=history,
        max_new_tokens=min(options.max_new_tokens or settings.max_new_tokens, settings.max_new_tokens),
        temperature=settings.temperature if options.temperature is None else options.temperature,
        deadline=job.deadline,
        min_new_tokens=options.min_new_tokens or 0,
        mood=mood,
    )


class StepUpdates:
    """After every decoding step: writes partial replies, and finds the rows whose job was cancelled.

    Each job's reply-so-far goes into its record at most every ``partial_interval_s``
    (0: never); the cancel flags are read as ``jobqueue.cancel.RunningCancels`` says.
    """

    def __init__(self, store: JobStore, engine: Engine, partial_interval_s: float,
                 safety: SafetyFilter | None = None):
        self.store, self.engine, self.safety = store, engine, safety
        self.partial_interval_s = partial_interval_s
        now = time.monotonic()
        self._next_write = now + partial_interval_s
        self.cancels = cancel.RunningCancels(store)

    def update(self, jobs: dict[int, RunningJob], session: ReplySession) -> set[int]:
        """The keys of ``jobs`` (the session's running rows) to stop now: their jobs were cancelled."""
        now = time.monotonic()
        if self.partial_interval_s > 0 and now >= self._next_write:
            self._write_partials(jobs, session)
            self._next_write = now + self.partial_interval_s
        key_of = {job.record.job_id: key for key, job in jobs.items()}
        return {key_of[job_id] for job_id in self.cancels.due(list(key_of))}

    def _write_partials(self, jobs: dict[int, RunningJob], session: ReplySession) -> None:
        for key, job in jobs.items():
            text = self.engine.text_of(session.tokens(key))
            if self.safety is not None:  # never a listed term, nor the start of one
                text = self.safety.safe_prefix(text)
            if text and text != job.record.reply:
                job.record.reply_so_far(text)
                self.store.put(job.record, runner=consumer_id())


def _drop_cancelled(store: JobStore, jobs: list[RunningJob]) -> list[RunningJob]:
    """Finish the jobs cancelled during the sentiment pass (they keep their label); return the rest."""
    cancelled = cancel.requested(store, [job.record.job_id for job in jobs])
    for job in jobs:
        if job.record.job_id in cancelled:
            _settle(store, job, cancel.stopped(job.record))
    return [job for job in jobs if job.record.job_id not in cancelled]


def _settle(store: JobStore, job: RunningJob, record: JobRecord) -> None:
    """Write the job's final record, then acknowledge the message this process took for it."""
    save_final(store, record, runner=consumer_id())
    if job.taken is not None:
        job.taken.ack()
