"""Atomic admission: a job is queued whole, in one step, or not at all.

The producer publishes through Celery as before, inside ``admitting(plan)``.
Kombu hands the finished envelope to our channel's ``_put``
(``jobqueue.queue.transport``), which runs ``_ADMIT_SCRIPT`` instead of a plain
LPUSH: the depth check against ``MAX_QUEUE``, the ``queued`` record, the job's
entry among the open jobs, its conversation's pending turn and the envelope,
its place in line (``jobqueue.queue.line``) and its idempotency key's claim, all in one Lua
script. So ``MAX_QUEUE`` is never overshot by concurrent
submitters, a producer that dies mid-submit leaves nothing behind, and a
publish that kombu retries after a dropped connection does not queue the job
twice (the script sees the record and does nothing). A submit whose idempotency key is claimed
writes nothing and answers the claimed job's id; so retries that race from many threads queue
one job.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from celery import Celery

from jobqueue.errors import IdempotencyConflict, QueueFull, TenantQueueFull
from jobqueue.protocol import (
    LANE_PRIORITY,
    LINE_KEY,
    LINE_SEQ_KEY,
    TASK_NAME,
    JobMessage,
    JobRecord,
    open_job_score,
)
from jobqueue.queue.line import PUSH_LUA, line_tenant_key
from jobqueue.record.lua import NEW_RECORD_LUA
from jobqueue.record.writes import new_record_keys

#: The record is written by the record module's pieces (``jobqueue.record.lua``).
#: KEYS: the lane to push to, the job's record, the open jobs, the pending turns (or ""), the
#: idempotency claim (or "") (those four: ``record.writes.new_record_keys``), LINE_KEY, LINE_SEQ_KEY, then every lane of the queue (for the depth).
#: ARGV: MAX_QUEUE, record JSON, record TTL, open-job score, job id, envelope, the target lane's own
#: limit (0: none), the request's digest (with a claim), the target lane's index, TENANT_MAX_QUEUE (0:
#: none), the job's tenant line (``line.line_tenant_key``). Returns {1, depth after} when queued (depth
#: -1: it already was), {0, depth} when the queue is full, {0, -lane depth} when its lane is, {4, the
#: tenant's depth} when the tenant's jobs fill TENANT_MAX_QUEUE, {2, job id} when the claim names a
#: job of the same request (nothing written), {3, job id} when it names a job of another request.
_ADMIT_SCRIPT = PUSH_LUA + NEW_RECORD_LUA + """
line_keys = {KEYS[6], KEYS[7]}
local claimed = claimed_answer(KEYS[5], ARGV[8])
if claimed then return claimed end
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, -1} end
local depth = 0
for i = 8, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth >= tonumber(ARGV[1]) then return {0, depth} end
local lane_limit = tonumber(ARGV[7])
if lane_limit > 0 then
  local lane_depth = redis.call('LLEN', KEYS[1])
  if lane_depth >= lane_limit then return {0, -lane_depth} end
end
local tenant_limit = tonumber(ARGV[10])
if tenant_limit > 0 then
  local tenant_depth = redis.call('ZCARD', ARGV[11])
  if tenant_depth >= tenant_limit then return {4, tenant_depth} end
end
write_new_record(KEYS[2], ARGV[2], ARGV[3], KEYS[3], ARGV[4], ARGV[5], KEYS[4], KEYS[5], ARGV[8])
line_push(KEYS[1], ARGV[9], ARGV[6], ARGV[5], false)
return {1, depth + 1}
"""


@dataclass
class Claim:
    """An idempotency key's claim: the job queued under it is the only one its retries get."""

    #: Where the claim lives (``protocol.idempotency_key``).
    key: str
    #: The request's digest (``protocol.request_digest``): another request under the key is refused.
    digest: str
    #: The key as its client gave it, for error messages.
    name: str = ""


@dataclass
class AdmissionPlan:
    """What one job's publish must write besides its message."""

    record: JobRecord
    max_queue: int
    ttl_s: int
    #: The limit of the job's own lane (MAX_QUEUE_BULK for a bulk job), 0 for none.
    lane_limit: int = 0
    claim: Claim | None = None
    #: TENANT_MAX_QUEUE: the most jobs of the record's tenant that may wait, 0 for no limit.
    tenant_limit: int = 0
    #: Set by ``run``: the id of the job queued under the claim (this one's, or an earlier one's).
    job_id: str | None = None

    @property
    def _tenant(self) -> str | None:
        return self.record.request.tenant if self.record.request else None

    def run(self, client, target_lane: str, lanes: list[str], envelope: str) -> None:
        """Run the admission script; raises QueueFull when ``max_queue`` messages wait, and
        IdempotencyConflict when the claim names a job of another request."""
        keys = [target_lane, *new_record_keys(self.record, self.claim.key if self.claim else None),
                LINE_KEY, LINE_SEQ_KEY, *lanes]
        args = [self.max_queue, self.record.to_json(), self.ttl_s, open_job_score(self.record),
                self.record.job_id, envelope, self.lane_limit, self.claim.digest if self.claim else "",
                lanes.index(target_lane), self.tenant_limit, line_tenant_key(self._tenant)]
        outcome, value = client.eval(_ADMIT_SCRIPT, len(keys), *keys, *args)
        if outcome in (2, 3):
            self.job_id = value.decode()
            if outcome == 3:
                raise IdempotencyConflict(self.job_id)
            return
        if outcome == 4:
            raise TenantQueueFull(int(value), self.tenant_limit, self._tenant)
        if not outcome and value < 0:
            raise QueueFull(-int(value), self.lane_limit, lane=self.record.request.priority)
        if not outcome:
            raise QueueFull(int(value), self.max_queue)
        self.job_id = self.record.job_id


_current: contextvars.ContextVar[AdmissionPlan | None] = contextvars.ContextVar("admission_plan", default=None)


def current_plan() -> AdmissionPlan | None:
    return _current.get()


@contextlib.contextmanager
def admitting(plan: AdmissionPlan) -> Iterator[None]:
    token = _current.set(plan)
    try:
        yield
    finally:
        _current.reset(token)


def submit_job(celery: Celery, record: JobRecord, message: JobMessage, *, max_queue: int, ttl_s: int,
               lane_limit: int = 0, claim: Claim | None = None, tenant_limit: int = 0) -> str:
    """Queue one job atomically with its record, in its priority's lane, and with its idempotency
    ``claim``; returns the id of the job queued (an earlier one's when the claim was taken). Raises
    QueueFull (the queue holds ``max_queue``, or its lane ``lane_limit``), TenantQueueFull (its
    tenant has ``tenant_limit`` jobs waiting), IdempotencyConflict, or kombu's errors when Redis fails."""
    plan = AdmissionPlan(record, max_queue, ttl_s, lane_limit, claim, tenant_limit)
    with admitting(plan):
        _send(celery, record.job_id, message)
    return plan.job_id or record.job_id


def resend_job(celery: Celery, record: JobRecord) -> None:
    """Queue a job whose record is open but whose message is gone, under the same id."""
    _send(celery, record.job_id, JobMessage(request=record.request, submitted_at=record.submitted_at,
                                            start_by=record.start_by, timeout_s=record.timeout_s))


def _send(celery: Celery, job_id: str, message: JobMessage) -> None:
    send_job(celery, job_id, message, LANE_PRIORITY)


def send_job(celery: Celery, job_id: str, message: JobMessage, lane_priority: dict[str, int], **options) -> None:
    """Publish a job's Celery message, with its lane's priority as this broker counts them; ``options``
    go to the publish (``mandatory=True``, say)."""
    send_raw(celery, job_id, message.model_dump(mode="json"), message.request.priority,
             message.request.tenant or "", lane_priority, **options)


def send_raw(celery: Celery, job_id: str, raw_message: dict, lane: str, tenant: str,
             lane_priority: dict[str, int], **options) -> None:
    """``send_job`` for a message as it came off the queue. The ``tenant`` header names the job's
    tenant for the line index (``jobqueue.queue.line``: each tenant's depth and the fair intake)."""
    # Celery's kwargsrepr (for monitors such as Flower) would repeat the first 1,024 characters of the
    # user's text in the headers, escaped: half the size of a message of Chinese text, and the text
    # shown to whoever watches the queue. The job id says which job it is.
    celery.send_task(TASK_NAME, task_id=job_id, kwargs={"message": raw_message}, priority=lane_priority[lane],
                     headers={"tenant": tenant}, argsrepr="()", kwargsrepr=f"{{'message': <job {job_id}>}}",
                     **options)
