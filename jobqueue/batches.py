"""Batches: many jobs submitted as one (``POST /v1/batches``), and what they add up to.

A batch is a record in Redis (``batch_record_key``): its tenant, its job ids in input order, when
it was made and whether it was cancelled. Its jobs are ordinary jobs with ordinary records; the
batch's status and counts are read from those records (``get_many``, in chunks), never stored.
The record expires RESULT_TTL_S after it is written, as its jobs' records do.

A batch submitted with an idempotency key is claimed first (``BatchClaims``, one Lua script a step):
the claim fixes the batch's id and its requests' digest before any job is queued, and holds a lease
of the gateway that queues it. A retry finds the batch done (its id), another request under the key
(a conflict), or the batch being queued (it waits; once the lease lapses, a crashed gateway's, it
takes the batch over under the same id, its jobs' own idempotency keys finding the jobs already
queued). So one key gives one batch, and a crash never leaves the key stuck.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import JobRecord, JobRequest, JobStatus, batch_idempotency_key, batch_record_key, request_digest

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


#: KEYS: the claim. ARGV: a new batch id, the requests' digest, the caller's owner token, the lease (ms),
#: the claim's TTL (s). Returns {outcome, batch id}: ``new`` (claimed for the caller, who queues the
#: batch), ``done`` (queued already), ``conflict`` (another request's), ``busy`` (another gateway's
#: lease holds), ``resume`` (the lease lapsed: the caller holds it now and queues the batch again).
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('HMGET', KEYS[1], 'batch', 'digest', 'until', 'done')
if not held[1] then
  redis.call('HSET', KEYS[1], 'batch', ARGV[1], 'digest', ARGV[2], 'owner', ARGV[3],
             'until', now + tonumber(ARGV[4]), 'done', '0')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'new', ARGV[1]}
end
if held[2] ~= ARGV[2] then return {'conflict', held[1]} end
if held[4] == '1' then return {'done', held[1]} end
if tonumber(held[3]) > now then return {'busy', held[1]} end
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'until', now + tonumber(ARGV[4]))
return {'resume', held[1]}
"""
#: KEYS: the claim. ARGV: the owner token, the lease (ms). Extends the lease while the caller holds it.
_RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'until', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
return 1
"""
#: KEYS: the claim, the batch record. ARGV: the owner token. Marks the claim done, expiring with the
#: record; or, with ARGV[2] == 'release', deletes a claim the caller holds and has not finished.
_SETTLE_LUA = """
if ARGV[2] == 'release' then
  local held = redis.call('HMGET', KEYS[1], 'owner', 'done')
  if held[1] == ARGV[1] and held[2] ~= '1' then redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'done', '1')
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


def batch_digest(requests: list[JobRequest]) -> str:
    """The SHA-256 of a batch's requests, in order: a retry under the same key must send the same."""
    return hashlib.sha256(" ".join(request_digest(request) for request in requests).encode()).hexdigest()


@dataclass
class Claimed:
    """What a claim answered: ``outcome`` (``new``, ``resume``, ``done``, ``busy``, ``conflict``), the batch id."""

    outcome: str
    batch_id: str
    key: str
    owner: str


class BatchClaims:
    """Idempotency claims of batches: claim one, extend its lease, settle it (done or released)."""

    def __init__(self, client: redis.Redis, ttl_s: int, lease_s: float):
        self.redis, self.ttl_s, self.lease_ms = client, ttl_s, int(lease_s * 1000)

    def claim(self, tenant: str | None, key: str, digest: str, owner: str) -> Claimed:
        claim_key = batch_idempotency_key(tenant, key)
        outcome, batch_id = self.redis.eval(_CLAIM_LUA, 1, claim_key, new_batch_id(), digest, owner,
                                            self.lease_ms, self.ttl_s)
        return Claimed(outcome.decode(), batch_id.decode(), claim_key, owner)

    def renew(self, claimed: Claimed) -> bool:
        return bool(self.redis.eval(_RENEW_LUA, 1, claimed.key, claimed.owner, self.lease_ms))

    def finish(self, claimed: Claimed) -> None:
        """The batch's record is written: the claim answers ``done`` from now on, as long as the record lives."""
        self.redis.eval(_SETTLE_LUA, 2, claimed.key, batch_record_key(claimed.batch_id), claimed.owner, "done")

    def release(self, claimed: Claimed) -> None:
        """The batch was refused (queue full): the key is free again, for a retry to make a new batch."""
        self.redis.eval(_SETTLE_LUA, 2, claimed.key, batch_record_key(claimed.batch_id), claimed.owner, "release")


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
