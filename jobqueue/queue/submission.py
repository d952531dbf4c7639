"""Atomic admission: a job is queued whole, in one step, or not at all.

The producer publishes through Celery as before, inside ``admitting(plan)``.
Kombu hands the finished envelope to our channel's ``_put``
(``jobqueue.queue.transport``), which runs ``_ADMIT_SCRIPT`` instead of a plain
LPUSH: the depth check against ``MAX_QUEUE``, the ``queued`` record, the job's
entry among the open jobs, its conversation's pending turn and the envelope,
all in one Lua script. So ``MAX_QUEUE`` is never overshot by concurrent
submitters, a producer that dies mid-submit leaves nothing behind, and a
publish that kombu retries after a dropped connection does not queue the job
twice (the script sees the record and does nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from celery import Celery

from jobqueue.errors import QueueFull
from jobqueue.protocol import (
    LANE_PRIORITY,
    OPEN_JOBS_KEY,
    TASK_NAME,
    JobMessage,
    JobRecord,
    job_key,
    open_job_score,
    pending_turns_key,
)

#: KEYS: the lane to push to, the job's record, the open jobs, the pending turns (or ""), then
#: every lane of the queue (for the depth). ARGV: MAX_QUEUE, record JSON, record TTL, open-job
#: score, job id, envelope, the target lane's own limit (0: none). Returns {1, depth after} when
#: queued (depth -1: it already was), {0, depth} when the queue is full, {0, -lane depth} when
#: its lane is.
_ADMIT_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, -1} end
local depth = 0
for i = 5, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth >= tonumber(ARGV[1]) then return {0, depth} end
local lane_limit = tonumber(ARGV[7])
if lane_limit > 0 then
  local lane_depth = redis.call('LLEN', KEYS[1])
  if lane_depth >= lane_limit then return {0, -lane_depth} end
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
if KEYS[4] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
redis.call('LPUSH', KEYS[1], ARGV[6])
return {1, depth + 1}
"""


@dataclass
class AdmissionPlan:
    """What one job's publish must write besides its message."""

    record: JobRecord
    max_queue: int
    ttl_s: int
    #: The limit of the job's own lane (MAX_QUEUE_BULK for a bulk job), 0 for none.
    lane_limit: int = 0

    def run(self, client, target_lane: str, lanes: list[str], envelope: str) -> None:
        """Run the admission script; raises QueueFull when ``max_queue`` messages wait."""
        conversation = self.record.request.conversation_scope if self.record.request else None
        keys = [target_lane, job_key(self.record.job_id), OPEN_JOBS_KEY,
                pending_turns_key(conversation) if conversation else "", *lanes]
        args = [self.max_queue, self.record.to_json(), self.ttl_s, open_job_score(self.record),
                self.record.job_id, envelope, self.lane_limit]
        queued, depth = client.eval(_ADMIT_SCRIPT, len(keys), *keys, *args)
        if not queued and depth < 0:
            raise QueueFull(-int(depth), self.lane_limit, lane=self.record.request.priority)
        if not queued:
            raise QueueFull(int(depth), self.max_queue)


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
               lane_limit: int = 0) -> None:
    """Queue one job atomically with its record, in its priority's lane; raises QueueFull (the
    queue holds ``max_queue``, or its lane ``lane_limit``), or kombu's errors when Redis fails."""
    with admitting(AdmissionPlan(record, max_queue, ttl_s, lane_limit)):
        _send(celery, record.job_id, message)


def resend_job(celery: Celery, record: JobRecord) -> None:
    """Queue a job whose record is open but whose message is gone, under the same id."""
    _send(celery, record.job_id, JobMessage(request=record.request, submitted_at=record.submitted_at,
                                            start_by=record.start_by, timeout_s=record.timeout_s))


def _send(celery: Celery, job_id: str, message: JobMessage) -> None:
    send_job(celery, job_id, message, LANE_PRIORITY)


def send_job(celery: Celery, job_id: str, message: JobMessage, lane_priority: dict[str, int], **options) -> None:
    """Publish a job's Celery message, with its lane's priority as this broker counts them; ``options``
    go to the publish (``mandatory=True``, say)."""
    celery.send_task(TASK_NAME, task_id=job_id, kwargs={"message": message.model_dump(mode="json")},
                     priority=lane_priority[message.request.priority], **options)
