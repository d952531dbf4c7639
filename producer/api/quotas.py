"""Per-tenant submit rate: a token bucket in Redis, shared by every gateway, one script per submit.

A tenant (API_KEYS' name; one bucket for a gateway without tenants) gets ``TENANT_SUBMIT_RATE``
submits a second on average and at most ``TENANT_SUBMIT_BURST`` at once. The bucket is read,
refilled by the time passed (Redis's own clock, so gateways' clocks do not matter) and spent in
one Lua script, so concurrent submits across gateways never overspend it. A refused submit
gets 429 ``rate_limited`` with Retry-After: the whole seconds until a token is back.
"""

from __future__ import annotations

import math

import redis

from jobqueue.errors import BrokerUnavailable
from jobqueue.protocol import rate_key

#: KEYS: the tenant's bucket. ARGV: tokens a second, the bucket's size. Returns {1, 0} when a token
#: was spent, {0, milliseconds until the next token} when none was left.
_SPEND_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or t
tokens = math.min(burst, tokens + math.max(0, t - at) * rate)
local ok = 0
if tokens >= 1 then tokens, ok = tokens - 1, 1 end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', t))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
if ok == 1 then return {1, 0} end
return {0, math.ceil((1 - tokens) / rate * 1000)}
"""


class RateLimited(Exception):
    """The tenant spent its submit tokens (TENANT_SUBMIT_RATE, TENANT_SUBMIT_BURST)."""

    def __init__(self, rate: float, burst: int, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(f"too many submits: this tenant may submit {rate:g} jobs a second, at most {burst} "
                         f"at once (TENANT_SUBMIT_RATE, TENANT_SUBMIT_BURST); retry in {retry_after_s} s")


class SubmitRate:
    """The submit token buckets; ``rate`` 0 means no limit."""

    def __init__(self, client: redis.Redis, rate: float, burst: int):
        self.client, self.rate, self.burst = client, rate, burst

    def spend(self, tenant: str | None) -> None:
        """Take one submit token of ``tenant``'s, or raise RateLimited. Redis errors propagate."""
        if self.rate <= 0:
            return
        try:
            ok, wait_ms = self.client.eval(_SPEND_SCRIPT, 1, rate_key(tenant), repr(self.rate), self.burst)
        except redis.RedisError as err:
            raise BrokerUnavailable(f"the submit rate could not be checked: {type(err).__name__}") from None
        if not ok:
            raise RateLimited(self.rate, self.burst, max(1, math.ceil(int(wait_ms) / 1000)))
