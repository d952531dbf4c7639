"""The Celery task: the delivered job and any jobs waiting behind it, run as one batch.

``run_job`` turns a Celery message into a sequence of record writes:
``running`` → sentiment known → partial replies → ``succeeded`` (or
``failed`` / ``expired``). When more jobs wait in the queue, the task takes up
to ``BATCH_MAX - 1`` of them (``worker.queue.intake``), admits each
(``worker.admission``) and runs them all as one batch (``worker.batch``): one
sentiment pass, one batched generation, each job's record written and its
message acknowledged on its own.
The engine is loaded once per pool process (``WorkerRuntime.load_engine``),
never in the parent before it forks; the parent only writes ``timed_out``
records when the hard time limit kills a child.
"""

from __future__ import annotations

import logging
import time

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task
from celery.exceptions import Reject

from producer.protocol import TASK_NAME, ErrorCode, JobError, JobRecord, JobStatus
from worker.admission import TurnNotReady, admit
from worker.batch import run_jobs
from worker.queue.intake import Intake
from worker.outcome import finish, save_final
from worker.runtime import WorkerRuntime

log = logging.getLogger("qwen_allinone.worker")

#: A later turn of a conversation whose earlier turn still runs is retried after this long.
TURN_RETRY_S = 0.25
#: A job handed back because Redis failed waits this long first, doubled for each failure in
#: a row, up to the maximum.
REDIS_BACKOFF_S = 0.5
REDIS_BACKOFF_MAX_S = 30.0
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
            self.runtime.redis_failures = 0
        except TurnNotReady as wait:
            # Back to the queue for a moment; the worker serves other jobs meanwhile.
            if not self.request.retries:  # once, not every 0.25 s
                log.info("job=%s waits: %s", self.request.id, wait)
            raise self.retry(countdown=TURN_RETRY_S) from None
        except redis.RedisError as err:
            # Redis is gone even after retries, or refuses writes (OOM, READONLY, MISCONF):
            # hand the job back rather than acknowledge it with its record unfinished. Back off
            # first, doubling each time in a row, so a refusing Redis is not hammered.
            failures = self.runtime.redis_failures = self.runtime.redis_failures + 1
            pause = min(REDIS_BACKOFF_S * 2 ** (failures - 1), REDIS_BACKOFF_MAX_S)
            log.error("job=%s handed back to the queue in %.1fs (Redis failure %d in a row): %s",
                      self.request.id, pause, failures, err)
            time.sleep(pause)
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
