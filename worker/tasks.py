"""The Celery task: the delivered job and any jobs waiting behind it, run as one batch.

``run_job`` turns a Celery message into a sequence of record writes:
``running`` → sentiment known → partial replies → ``succeeded`` (or
``failed`` / ``expired``). When more jobs wait in the queue, the task takes up
to ``BATCH_MAX - 1`` of them, and more as rows free up while it decodes
(``worker.joining``), admits each (``worker.admission``) and runs them as one
batch (``worker.batch``): a sentiment pass for those that start together, one
decoding session that the others join, each job's record written and its
message acknowledged on its own.
The engine is loaded once per pool process (``WorkerRuntime.load_engine``),
never in the parent before it forks; the parent only writes ``timed_out``
records when the hard time limit kills a child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import psutil
import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task
from celery.exceptions import Reject

from jobqueue.protocol import TASK_NAME, ErrorCode, JobError, JobRecord, JobStatus
from worker.admission import NotReadyYet, admit
from worker.batch import run_jobs
from worker.joining import Joiners, JoiningState, admit_taken, take_company
from jobqueue.queue.amqp import mark_unsent
from jobqueue.queue.brokers import intake_for, requeue_later
from jobqueue.queue.intake import TakenJob
from jobqueue.queue.liveness import release_runs
from jobqueue.outcome import finish, save_final
from worker.runtime import WorkerRuntime

log = logging.getLogger("qwen_allinone.worker")

#: A later turn of a conversation whose earlier turn still runs is retried after this long.
TURN_RETRY_S = 0.25
#: A job handed back because Redis failed waits this long first, doubled for each failure in
#: a row, up to the maximum.
REDIS_BACKOFF_S = 0.5
REDIS_BACKOFF_MAX_S = 30.0
#: A job killed by the hard time limit started at most this long before the limit's start
#: (the admission's own time): an older start belongs to an earlier attempt.
STARTED_SLACK_S = 1.0


class JobTask(Task):
    """Celery task class; records ``timed_out`` when the hard time limit kills the job.

    Celery calls ``on_failure`` in the parent process for a hard time limit, so
    this needs only the store, not the model.
    """

    runtime: WorkerRuntime  # set by register()
    #: This process's joining state and Redis outage state (their modules change them); set by register().
    joining: JoiningState
    redis_outage: RedisOutage

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if not isinstance(exc, TimeLimitExceeded):
            return
        store = self.runtime.parent_store
        limit = self.runtime.settings.hard_time_limit_s
        if self.runtime.settings.broker_kind == "amqp":
            # Celery acknowledges the delivered message after this, whatever is recorded here;
            # RabbitMQ cannot be read for lost jobs, so it is marked for the reconciler, and its
            # final record (below, or a later run's) clears the mark. The taken jobs need none:
            # the killed process's connection closed, and RabbitMQ handed them back.
            _mark_or_requeue(self.app, store, task_id, kwargs)
        message = f"killed by the hard time limit ({limit:g}s); the worker moved on to the next job"
        if waiting_pid := self.redis_outage.waiting_pid():
            # Killed while it waited out a Redis that refused writes: the job did not time out.
            # Its message is acknowledged now; the reconciler finds the job open and re-sends it,
            # and liveness hands back what its batch took.
            self.redis_outage.clear_waiting()
            log.warning("job=%s: its pool process %d was waiting for Redis when the hard time limit hit; "
                        "left for the reconciler", task_id, waiting_pid)
            return
        try:
            pool_pid, taken_ids = store.batch_of(task_id)
            if pool_pid is not None and not _alive(pool_pid):
                # Celery reports the limit for a job whose pool process was killed from outside
                # (the OOM killer) before it could report the loss: the jobs did not time out.
                # Liveness hands back the taken ones; the reconciler re-sends the delivered one.
                log.warning("job=%s: its pool process %d died before the hard time limit; the jobs go back to "
                            "the queue", task_id, pool_pid)
                return
            # The jobs taken into the killed batch died with it. Their messages come back when
            # the killed pool process's heartbeat lapses, and are then skipped (final records).
            # If this write fails, the reconciler finds the jobs open and re-sends them.
            for job_id in [task_id, *taken_ids]:
                record = store.get(job_id)
                if record is not None and _ran_into_the_limit(record, limit):
                    error = JobError(code=ErrorCode.TIMED_OUT, message=message)
                    save_final(store, finish(record, JobStatus.TIMED_OUT, error))
                elif record is not None and not record.status.is_final:
                    # Celery counted the limit while a new pool process was still loading the
                    # model: this attempt never started. Its message is acknowledged; the
                    # reconciler finds the job open and re-sends it.
                    log.warning("job=%s hit the hard time limit before it started; left for the reconciler",
                                job_id)
            store.forget_batch(task_id)
        except Exception:  # never let bookkeeping break Celery's acknowledgement
            log.exception("job=%s (or a job of its batch) could not be recorded as timed_out", task_id)


def _mark_or_requeue(app: Celery, store, task_id: str, kwargs: dict) -> None:
    """Mark the job for the reconciler; where Redis refuses even that (the batch was killed while
    it waited for Redis to take writes), put its message back in the queue instead."""
    try:
        mark_unsent(store.redis, [task_id])
    except Exception as err:
        log.warning("job=%s: not marked unsent (%s); its message goes back to the queue", task_id, err)
        try:
            requeue_later(app, "amqp", task_id, kwargs.get("message") or {}, 0.0)
        except Exception:
            log.exception("job=%s: neither marked nor requeued; its record stays open", task_id)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: it is dead, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ran_into_the_limit(record: JobRecord, limit_s: float) -> bool:
    """True if the job started in the attempt the hard time limit just killed (within the last limit_s)."""
    if record.status is not JobStatus.RUNNING or record.started_at is None:
        return False
    return record.started_at >= time.time() - limit_s - STARTED_SLACK_S


def register(app: Celery, runtime: WorkerRuntime) -> Task:
    settings = runtime.settings
    runtime.intake = intake_for(app, settings, heartbeat_s=settings.broker_heartbeat_s)

    # max_retries=None: a later turn retries until its earlier turn finishes or it
    # expires (QUEUE_TIMEOUT_S), never into a MaxRetriesExceededError.
    @app.task(name=TASK_NAME, bind=True, base=JobTask, runtime=runtime, joining=JoiningState(),
              redis_outage=RedisOutage(), max_retries=None)
    def run_job(self: JobTask, *args, **kwargs) -> None:
        # Any arguments are accepted here and checked in admit(), so a malformed
        # message is recorded as failed instead of dying in Celery's argument check.
        message = kwargs.pop("message", None)
        unexpected = {f"args[{i}]" for i in range(len(args))} | set(kwargs)
        try:
            run_batch(self.runtime, self.request.id, message, unexpected, hostname=self.request.hostname or "unknown",
                      joining=self.joining)
            self.redis_outage.failures = 0
        except NotReadyYet as wait:
            # Back to the queue for a moment; the worker serves other jobs meanwhile.
            if not self.request.retries:  # once, not every 0.25 s
                log.info("job=%s waits: %s", self.request.id, wait)
            # Not Celery's retry: its countdown would hold the job in this worker's memory until
            # the pool is free. A dead pool process's job comes back at once (on either broker),
            # before its claim lapses (LIVENESS_TTL_S): it waits in the queue, where a running
            # batch can take it.
            try:
                requeue_later(self.app, self.runtime.settings.broker_kind, self.request.id, message, TURN_RETRY_S,
                              self.request.retries + 1)
            except Exception as err:
                raise Reject(f"not requeued: {err}", requeue=True) from err
            return
        except redis.RedisError as err:
            # Redis is gone even after retries, or refuses writes (OOM, READONLY, MISCONF):
            # hand the job back rather than acknowledge it with its record unfinished.
            _wait_until_redis_takes_writes(self.runtime, self.redis_outage, self.request.id, err)
            try:  # what this batch took and could not hand back while Redis refused
                self.runtime.intake.hand_back_unsettled()
            except Exception as again:  # the next take tries again
                log.error("job=%s: taken jobs not handed back yet: %s", self.request.id, again)
            raise Reject(str(err), requeue=True) from err

    return run_job


class RedisOutage:
    """What this module changes while Redis refuses writes: failures in a row (the back-off), and the
    pid of a pool process waiting for Redis, in shared memory made in the parent before it forks
    (the parent's hard-time-limit handler reads it: such a kill is not the job's time out)."""

    def __init__(self):
        self.failures = 0
        self.waiting = multiprocessing.RawValue("i", 0)

    def waiting_pid(self) -> int:
        return self.waiting.value

    def clear_waiting(self) -> None:
        self.waiting.value = 0


def _wait_until_redis_takes_writes(runtime: WorkerRuntime, outage: RedisOutage, job_id: str,
                                   err: redis.RedisError) -> None:
    """Back off (doubling, in a row across jobs) until a write succeeds.

    Handing a job back is itself a write; tried while Redis still refuses, it would fail
    and leave the message with this live worker until the visibility timeout. Waiting
    here also keeps a refusing Redis from being hammered. The hard time limit bounds it;
    ``outage.waiting`` tells the parent that such a kill is not the job's time out.
    """
    outage.waiting.value = os.getpid()
    try:
        _back_off_until_writable(runtime, outage, job_id, err)
    finally:
        outage.clear_waiting()


def _back_off_until_writable(runtime: WorkerRuntime, outage: RedisOutage, job_id: str,
                             err: redis.RedisError) -> None:
    while True:
        outage.failures += 1
        failures = outage.failures
        pause = min(REDIS_BACKOFF_S * 2 ** (failures - 1), REDIS_BACKOFF_MAX_S)
        log.error("job=%s: Redis failed (%s); waiting %.1fs before handing it back to the queue (failure %d "
                  "in a row)", job_id, err, pause, failures)
        time.sleep(pause)
        try:
            runtime.store.probe_writes()
            return
        except redis.RedisError as again:
            err = again


def run(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str], hostname: str) -> JobRecord:
    """Run one job alone and return its final record (also written to Redis)."""
    admitted = admit(runtime, job_id, raw_message, unexpected, hostname)
    return admitted if isinstance(admitted, JobRecord) else run_jobs(runtime, [admitted])[0]


def run_batch(runtime: WorkerRuntime, job_id: str, raw_message, unexpected: set[str],
              hostname: str, joining: JoiningState | None = None) -> list[JobRecord]:
    """Run the delivered job together with up to BATCH_MAX - 1 jobs already waiting in the queue,
    and with those that join while it decodes (``worker.joining``; ``joining``: this process's
    state of it, a fresh one when not given).

    Each taken message is acknowledged once its job's final record is written;
    whatever is left unsettled when this returns or raises goes back to the queue.
    """
    settings = runtime.settings
    joining = joining or JoiningState()
    started = time.monotonic()  # the hard time limit counts from about here
    # For the parent, should the hard time limit end this batch: which pool process runs it
    # (alive then, or already dead of something else) and which jobs it took.
    runtime.store.set_batch(job_id, os.getpid(), [], settings.visibility_timeout_s)
    taken: list[TakenJob] = []
    try:
        first = admit(runtime, job_id, raw_message, unexpected, hostname)
        if isinstance(first, JobRecord):
            return [first]
        taken.extend(take_company(runtime, joining))
        if taken:
            log.info("job=%s batch: took %s", job_id, " ".join(item.job_id for item in taken))
        in_batch = {job_id}
        company, finished = admit_taken(runtime, taken, hostname, in_batch)
        if company:
            runtime.store.set_batch(job_id, os.getpid(), [job.record.job_id for job in company],
                                    settings.visibility_timeout_s)
        joiners = Joiners(runtime, joining, job_id, taken, hostname, in_batch, started)
        records = run_jobs(runtime, [first, *company], joiners)
        return finished + records + joiners.finished
    finally:
        joining.batch_ended(1 + len(taken))
        _settle_batch(runtime, job_id, taken)


def _settle_batch(runtime: WorkerRuntime, job_id: str, taken: list[TakenJob]) -> None:
    """Hand back what the batch took and did not finish, and release the batch's claims."""
    for item in taken:
        if not item.settled:
            try:
                item.requeue()
            except Exception as err:  # Redis is down: the intake hands it back at its next take
                log.error("job=%s could not be handed back to the queue yet: %s", item.job_id, err)
    try:
        release_runs(runtime.store.redis, [job_id, *(item.job_id for item in taken)])
        runtime.store.forget_batch(job_id)
    except redis.RedisError as err:  # both expire (hard time limit, VISIBILITY_TIMEOUT_S)
        log.error("job=%s: could not release its batch: %s", job_id, err)
