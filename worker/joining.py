"""Jobs taken from the queue into a batch: beside the delivered job at its start, and while it decodes.

A batch starts with the delivered job and up to ``BATCH_MAX - 1`` waiting ones
(``take_company``). While its replies decode, ``Joiners`` looks for more jobs
at most every ``JOIN_CHECK_S`` and takes as many as the batch has free rows
(continuous batching). Either way a job is taken through the queue package
(an atomic take, held by this live process, handed back if it dies), admitted
on its own, and acknowledged only after its own final record.

A batch takes joiners only during its first ``JOIN_WINDOW_S``: a joiner's
deadline is at most ``JOB_TIMEOUT_S`` after it joins, so every row of a batch
ends before the hard time limit (``JOB_TIMEOUT_S + TIME_LIMIT_GRACE_S +
JOIN_WINDOW_S``), which stays the backstop for a pass that hangs. After the
window the batch drains, and the next delivered message starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

from jobqueue.protocol import JobRecord
from worker.admission import NotReadyYet, RunningJob, admit
from jobqueue.queue.intake import TakenJob
from worker.runtime import WorkerRuntime

log = logging.getLogger("qwen_allinone.worker")

#: After a batch of one, a job waits BATCH_WAIT_MS divided by this for others to arrive.
IDLE_WAIT_DIVISOR = 5
#: A decoding batch looks for waiting jobs at most this often (seconds): one Redis call.
JOIN_CHECK_S = 0.1


class JoiningState:
    """What this module changes between batches: the last batch's size (how long the next waits for
    company), and the parent's switch that stops running batches from taking joiners.

    The switch is shared memory made in the parent before it forks (``stop()`` runs there, on a warm
    shutdown); the size is per pool process."""

    def __init__(self):
        #: Jobs in this process's previous batch, joiners included.
        self.last_batch_size = 1
        self._stop = multiprocessing.RawValue("i", 0)

    def stop(self) -> None:
        """A warm shutdown began: running batches take no more joiners, so the worker exits once their
        rows end."""
        self._stop.value = 1

    @property
    def stopped(self) -> bool:
        return bool(self._stop.value)

    def batch_ended(self, size: int) -> None:
        """The batch ran ``size`` jobs, joiners included: under load, the next one waits for company."""
        self.last_batch_size = size


def take_company(runtime: WorkerRuntime, state: JoiningState) -> list[TakenJob]:
    """Up to BATCH_MAX - 1 waiting jobs to run beside the delivered one."""
    settings = runtime.settings
    taken = []
    if settings.batch_max > 1:
        # Under load (the last batch had company) clients served together come back
        # together: wait for them. After an idle spell, wait only a fifth of that, long
        # enough for a burst of clients arriving at once, short for a lone client.
        wait_s = settings.batch_wait_ms / 1000 / (1 if state.last_batch_size > 1 else IDLE_WAIT_DIVISOR)
        taken = _take(runtime, settings.batch_max - 1, wait_s)
    state.last_batch_size = 1 + len(taken)
    return taken


def admit_taken(runtime: WorkerRuntime, taken: list[TakenJob], hostname: str,
                in_batch: set[str]) -> tuple[list[RunningJob], list[JobRecord]]:
    """Admit taken jobs: those to run, and the final records of those finished at admission.

    ``in_batch`` holds the ids of the jobs the batch already runs; the admitted ones are added.
    A second copy of one of them (a message handed back while this process held the first) is
    acknowledged and dropped: the copy this batch holds stays unacknowledged until its final
    record, so the job is still redelivered if this worker dies.
    """
    jobs, finished = [], []
    for item in taken:
        if item.job_id in in_batch:
            log.warning("job=%s: a second copy of its message, taken while this batch runs it; dropped",
                        item.job_id)
            item.ack()
            continue
        try:
            admitted = admit(runtime, item.job_id, item.raw_message, item.unexpected, hostname)
        except NotReadyYet:
            item.requeue()  # its earlier turn may be in this very batch: after it, not beside it
            continue
        if isinstance(admitted, JobRecord):
            finished.append(admitted)
            item.ack()
        else:
            admitted.taken = item
            jobs.append(admitted)
            in_batch.add(item.job_id)
    return jobs, finished


class Joiners:
    """Waiting jobs taken into a batch while it decodes (``JOIN_WINDOW_S`` after it started)."""

    def __init__(self, runtime: WorkerRuntime, state: JoiningState, delivered_id: str, taken: list[TakenJob],
                 hostname: str, in_batch: set[str], started: float):
        """``started``: time.monotonic() when the task began, which the hard time limit counts from."""
        self.runtime = runtime
        self.state = state
        self.delivered_id = delivered_id
        #: Ids of the jobs the batch runs (a second copy of one is not run beside it).
        self.in_batch = in_batch
        #: Every message the batch took: the task hands back what is left unsettled when it ends.
        self.taken = taken
        self.hostname = hostname
        self.closes_at = started + runtime.settings.join_window_s
        self._next_check = time.monotonic() + JOIN_CHECK_S
        #: Final records of joiners finished at admission (expired, invalid, already final).
        self.finished: list[JobRecord] = []

    @property
    def open(self) -> bool:
        """Within the window, and the worker is not shutting down (it then lets its rows end)."""
        return (self.runtime.settings.batch_max > 1 and time.monotonic() < self.closes_at
                and not self.state.stopped)

    def due(self) -> bool:
        """Time to look for waiting jobs (the window is open and the last look was long enough ago)."""
        now = time.monotonic()
        if not self.open or now < self._next_check:
            return False
        self._next_check = now + JOIN_CHECK_S
        return True

    def take(self, room: int) -> list[RunningJob]:
        """Up to ``room`` waiting jobs, admitted and recorded as this batch's (for the hard time limit)."""
        taken = _take(self.runtime, room, 0.0, hand_back=False)  # the batch's own messages stay held
        if not taken:
            return []
        self.taken.extend(taken)
        log.info("job=%s batch: joined by %s", self.delivered_id, " ".join(item.job_id for item in taken))
        jobs, finished = admit_taken(self.runtime, taken, self.hostname, self.in_batch)
        self.finished.extend(finished)
        if jobs:
            # Before they run: should the hard time limit end this batch, the parent finishes them too.
            self.runtime.store.set_batch(self.delivered_id, os.getpid(),
                                         [item.job_id for item in self.taken if not item.settled],
                                         self.runtime.settings.visibility_timeout_s)
        return jobs


def _take(runtime: WorkerRuntime, limit: int, wait_s: float, hand_back: bool = True) -> list[TakenJob]:
    try:
        return runtime.intake.take(limit, wait_s, hand_back=hand_back)
    except Exception as err:  # batching is an optimization: the batch runs on regardless
        # What was taken before the error stays with the intake, which hands it back next time.
        log.warning("could not take more jobs for a batch: %s: %s", type(err).__name__, err)
        return []
