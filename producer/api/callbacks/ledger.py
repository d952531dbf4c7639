"""The callbacks' bookkeeping in Redis: which are due (``CALLBACKS_KEY``, scored by when to try),
their attempts, and the counts pending per host and per tenant that cap them (the final-record
script in ``jobqueue.store`` adds to both; ``forget`` takes away)."""

from __future__ import annotations

import logging
import time

import redis

from jobqueue.protocol import CALLBACK_ATTEMPTS_KEY, CALLBACK_LIMITS_KEY, CALLBACK_PENDING_KEY, CALLBACKS_KEY

log = logging.getLogger("qwen_allinone.gateway")

MAX_BACKOFF_S = 60.0

#: Claim due callbacks, oldest first, each one's score moved a lease ahead so no other gateway
#: takes it; at most ``room`` per host (a host at its share of the sender's slots is skipped, so a
#: flood to one slow host never keeps another's callback waiting). Looks at most ``scan`` entries.
#: KEYS: callbacks, attempts (``<job>:owner``). ARGV: now, lease end, how many, scan, room of a
#: host not named, then (host, room) pairs. Returns the claimed job ids.
_CLAIM_SCRIPT = """
local room = {}
for i = 6, #ARGV, 2 do room[ARGV[i]] = tonumber(ARGV[i + 1]) end
local want, scan, claimed, offset = tonumber(ARGV[3]), tonumber(ARGV[4]), {}, 0
while #claimed < want and offset < scan do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', offset, 100)
  if #due == 0 then break end
  for _, job_id in ipairs(due) do
    local owner = redis.call('HGET', KEYS[2], job_id .. ':owner') or ''
    local host = string.match(owner, '^([^\\n]*)') or ''
    local left = room[host] or tonumber(ARGV[5])
    if left > 0 and #claimed < want then
      claimed[#claimed + 1] = job_id
      room[host] = left - 1
    end
  end
  offset = offset + #due
end
for _, job_id in ipairs(claimed) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job_id) end
return claimed
"""
#: How many due callbacks one claim looks at, at most: past the caps of a few flooded hosts.
CLAIM_SCAN = 5000

#: Drop a callback and its attempts; if it was still pending, its host's and tenant's counts go down.
#: KEYS: callbacks, attempts, pending counts. ARGV: job id.
_FORGET_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local owner = redis.call('HGET', KEYS[2], ARGV[1] .. ':owner')
  local host, tenant = string.match(owner or '', '^([^\\n]*)\\n(.*)$')
  if host then
    for _, field in ipairs({'host:' .. host, 'tenant:' .. tenant}) do
      if redis.call('HINCRBY', KEYS[3], field, -1) <= 0 then redis.call('HDEL', KEYS[3], field) end
    end
  end
end
redis.call('HDEL', KEYS[2], ARGV[1], ARGV[1] .. ':first', ARGV[1] .. ':owner')
"""


class Ledger:
    def __init__(self, client: redis.Redis, lease_s: float, retry_for_s: float):
        self.redis = client
        self.lease_s = lease_s
        self.retry_for_s = retry_for_s

    def claim(self, how_many: int, per_host: int, room: dict[str, int]) -> list[str]:
        """Up to ``how_many`` due callbacks, each this gateway's for ``lease_s``: at most ``per_host``
        for one host, or its ``room`` (what its attempts under way leave of that)."""
        now = time.time()
        pairs = [item for host, left in room.items() for item in (host, left)]
        due = self.redis.eval(_CLAIM_SCRIPT, 2, CALLBACKS_KEY, CALLBACK_ATTEMPTS_KEY, now, now + self.lease_s,
                              how_many, CLAIM_SCAN, per_host, *pairs)
        return [raw.decode() for raw in due]

    def publish_limits(self, per_host: int, per_tenant: int) -> None:
        """The caps the final-record script holds each host's and tenant's pending callbacks to."""
        self.redis.hset(CALLBACK_LIMITS_KEY, mapping={"host": per_host, "tenant": per_tenant})

    def defer(self, job_id: str, delay_s: float) -> None:
        """Try again in ``delay_s``, not counted as an attempt (its host had no free slot)."""
        self.redis.zadd(CALLBACKS_KEY, {job_id: time.time() + delay_s}, xx=True)

    def forget(self, job_id: str) -> None:
        self.redis.eval(_FORGET_SCRIPT, 3, CALLBACKS_KEY, CALLBACK_ATTEMPTS_KEY, CALLBACK_PENDING_KEY, job_id)

    def retry_later(self, job_id: str, failure: str) -> None:
        """Count a failed attempt; due again after 1, 2, 4 ... s, or given up past ``retry_for_s``."""
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(CALLBACK_ATTEMPTS_KEY, job_id, 1)
            pipe.hsetnx(CALLBACK_ATTEMPTS_KEY, f"{job_id}:first", now)
            pipe.hget(CALLBACK_ATTEMPTS_KEY, f"{job_id}:first")
            attempts, _, first = pipe.execute()
        # The window runs from the first try, not from the job's end: callbacks that waited
        # for a gateway to come up still get their retries.
        next_try = now + min(2 ** (attempts - 1), MAX_BACKOFF_S)
        if next_try > float(first) + self.retry_for_s:
            log.error("callback of job %s given up after %d attempts (%s)", job_id, attempts, failure)
            self.forget(job_id)
            return
        log.warning("callback of job %s failed (%s); attempt %d, next in %.0fs", job_id, failure,
                    attempts + 1, next_try - time.time())
        self.redis.zadd(CALLBACKS_KEY, {job_id: next_try}, xx=True)
