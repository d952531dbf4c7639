"""Batches: many jobs submitted as one (``POST /v1/batches``), and what they add up to.

A batch is a record in Redis (``batch_record_key``): its tenant, its job ids in input order, when
it was made and whether it was cancelled. Its jobs are ordinary jobs with ordinary records; the
batch's status and counts are read from those records (``get_many``, in chunks), never stored.
The record expires RESULT_TTL_S after it is written, as its jobs' records do.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import JobRecord, JobStatus, batch_record_key

#: Records read per MGET when a batch's jobs are read.
READ_CHUNK = 200
#: The columns of a batch's results, in order (CSV header and JSON lines keys).
RESULT_COLUMNS = ("index", "text", "status", "label", "confidence", "reply")
#: The status of a job whose record expired or cannot be read.
MISSING = "missing"


@dataclass
class Batch:
    batch_id: str
    tenant: str | None
    job_ids: list[str]
    created_at: float
    cancelled: bool = False


def new_batch_id() -> str:
    return str(uuid.uuid4())


class BatchStore:
    """The batch records: write one, read one, mark one cancelled."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis, self.ttl_s = client, ttl_s

    def create(self, tenant: str | None, job_ids: list[str], batch_id: str | None = None) -> Batch:
        batch = Batch(batch_id or new_batch_id(), tenant, list(job_ids), time.time())
        self.redis.hset(batch_record_key(batch.batch_id), mapping={
            "tenant": tenant or "", "job_ids": json.dumps(batch.job_ids), "created_at": repr(batch.created_at),
            "cancelled": "0"})
        self.redis.expire(batch_record_key(batch.batch_id), self.ttl_s)
        return batch

    def get(self, batch_id: str) -> Batch | None:
        try:
            uuid.UUID(batch_id)
        except ValueError:
            return None
        fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(batch_record_key(batch_id)).items()}
        if "job_ids" not in fields:
            return None
        return Batch(batch_id, fields["tenant"] or None, json.loads(fields["job_ids"]), float(fields["created_at"]),
                     fields.get("cancelled") == "1")

    def mark_cancelled(self, batch_id: str) -> None:
        # HSET on a key with a TTL keeps the TTL: the record still expires with its jobs.
        self.redis.hset(batch_record_key(batch_id), "cancelled", "1")


def read_records(job_ids: list[str], get_many: Callable[[list[str]], list],
                 chunk: int = READ_CHUNK) -> Iterator[tuple[str, JobRecord | None]]:
    """(job id, record) in order, READ_CHUNK ids per round trip; None for an expired or unreadable one."""
    for start in range(0, len(job_ids), chunk):
        ids = job_ids[start:start + chunk]
        for job_id, record in zip(ids, get_many(ids)):
            yield job_id, None if isinstance(record, UnreadableRecord) else record


def job_status(record: JobRecord | None) -> str:
    return MISSING if record is None else record.status.value


def batch_status(batch: Batch, counts: Counter) -> str:
    """``cancelled`` once DELETEd; ``succeeded`` once every job is final (whatever each job's own
    status: see the counts); ``running`` once any job started or ended; else ``queued``."""
    if batch.cancelled:
        return "cancelled"
    open_jobs = counts[JobStatus.QUEUED.value] + counts[JobStatus.RUNNING.value]
    if open_jobs == 0:
        return "succeeded"
    if open_jobs < sum(counts.values()) or counts[JobStatus.RUNNING.value]:
        return "running"
    return "queued"


def result_row(index: int, record: JobRecord | None) -> dict:
    """One row of a batch's results: the input's index and text, the job's status, label, confidence, reply."""
    if record is None:
        return {"index": index, "text": None, "status": MISSING, "label": None, "confidence": None, "reply": None}
    sentiment = record.sentiment
    return {"index": index, "text": record.request.text if record.request else None,
            "status": record.status.value, "label": sentiment.label if sentiment else None,
            "confidence": round(sentiment.confidence, 4) if sentiment else None,
            "reply": record.reply if record.status is JobStatus.SUCCEEDED else None}
