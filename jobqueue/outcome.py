"""A job's final record: stamp it, write it, log it.

Admission, the batch steps and the parent's time-limit handler all finish
jobs; they share this module so none of them imports another.
"""

from __future__ import annotations

import logging

from jobqueue.protocol import JobError, JobRecord, JobStatus
from jobqueue.store import JobStore

log = logging.getLogger("qwen_allinone.worker")


def finish(record: JobRecord, status: JobStatus, error: JobError | None = None) -> JobRecord:
    return record.finish(status, error)


def save_final(store: JobStore, record: JobRecord, runner: str | None = None) -> JobRecord:
    """Write a final record, with its bookkeeping in the same step (``JobStore.put``).

    The conversation's next turn may go, the job leaves the open jobs, and the
    gateway's /metrics counts it. A record already final is left as it is and
    not counted or logged again. ``runner``: the run's consumer id; nothing is
    written once the job's run passed to another process.
    """
    if store.put(record, runner):
        _log_outcome(record)
    else:  # the job ran twice (a redelivery raced its first run); the client keeps the other result
        log.warning("job=%s ran again and ended %s; not written: its first final record stands, or its run "
                    "passed to another worker", record.job_id, record.status.value)
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


def to_ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"
