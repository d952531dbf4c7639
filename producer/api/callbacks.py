"""Completion callbacks: the gateway POSTs a final record to its job's ``callback_url``.

The worker never makes a network call of this kind: the final-record script
adds a job with a callback to ``CALLBACKS_KEY`` (scored by when to try), and
every gateway runs a ``CallbackSender`` that polls it. A gateway claims a due
job by moving its score a lease ahead in one step (``_CLAIM_SCRIPT``), so with
several gateways one sends at a time; a gateway that dies mid-send loses only
its lease. The body is the record's JSON, exactly as ``GET /v1/jobs/{id}``
returns it, signed with HMAC-SHA256 under ``CALLBACK_SECRET``:

    X-Qwen-Allinone-Signature: sha256=<hex of hmac(secret, body)>

A receiver recomputes it over the raw body and compares in constant time. A
2xx answer ends it; anything else (an error status, a refused connection, a
timeout) is retried after 1, 2, 4 ... s (at most ``MAX_BACKOFF_S``) for
``CALLBACK_RETRY_FOR_S`` after the first try, then given up with a log line; a
job whose record expired meanwhile is dropped.
Redirects are not followed: they could lead past CALLBACK_ALLOWED_HOSTS.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import httpx
from starlette.concurrency import run_in_threadpool

from producer.client import Client
from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import CALLBACK_ATTEMPTS_KEY, CALLBACKS_KEY, JobRecord

log = logging.getLogger("qwen_allinone.gateway")

SIGNATURE_HEADER = "X-Qwen-Allinone-Signature"
POLL_INTERVAL_S = 0.5
#: A claimed callback is this gateway's for this long; then another may try it.
LEASE_S = 30.0
MAX_BACKOFF_S = 60.0
SEND_TIMEOUT_S = 10.0
#: At most this many callbacks are sent at once by one gateway.
BATCH = 16

#: Claim the due callbacks: each one's score moves LEASE_S ahead, so no other gateway takes it.
#: KEYS: callbacks. ARGV: now, lease end, how many. Returns the claimed job ids.
_CLAIM_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, job_id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job_id) end
return due
"""


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class CallbackSender:
    def __init__(self, client: Client, secret: bytes, retry_for_s: float):
        self.client = client
        self.secret = secret
        self.retry_for_s = retry_for_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=SEND_TIMEOUT_S, follow_redirects=False) as http:
            while True:
                try:
                    claimed = await run_in_threadpool(self._claim)
                    await asyncio.gather(*(self._deliver(http, job_id) for job_id in claimed))
                except Exception as err:  # Redis away: try again at the next tick
                    log.warning("callbacks: %s: %s", type(err).__name__, err)
                await asyncio.sleep(POLL_INTERVAL_S)

    def _claim(self) -> list[str]:
        now = time.time()
        redis = self.client.store.redis
        return [raw.decode() for raw in redis.eval(_CLAIM_SCRIPT, 1, CALLBACKS_KEY, now, now + LEASE_S, BATCH)]

    async def _deliver(self, http: httpx.AsyncClient, job_id: str) -> None:
        try:
            record = await run_in_threadpool(self.client.get, job_id)
        except UnreadableRecord:
            record = None
        if record is None or record.request is None or not record.request.callback_url:
            await run_in_threadpool(self._forget, job_id)  # expired, or nothing to call
            return
        try:
            answer = await http.post(record.request.callback_url, content=self._body(record),
                                     headers=self._headers(record))
            failure = None if answer.is_success else f"HTTP {answer.status_code}"
        except Exception as err:  # refused, timed out, or a URL httpx cannot use: counted, retried
            failure = f"{type(err).__name__}: {err}"
        if failure is None:
            await run_in_threadpool(self._forget, job_id)
        else:
            await run_in_threadpool(self._retry_later, record, failure)

    def _body(self, record: JobRecord) -> bytes:
        return record.to_json().encode("utf-8")

    def _headers(self, record: JobRecord) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Qwen-Allinone-Job": record.job_id,
                SIGNATURE_HEADER: sign(self.secret, self._body(record))}

    def _retry_later(self, record: JobRecord, failure: str) -> None:
        redis = self.client.store.redis
        now = time.time()
        with redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(CALLBACK_ATTEMPTS_KEY, record.job_id, 1)
            pipe.hsetnx(CALLBACK_ATTEMPTS_KEY, f"{record.job_id}:first", now)
            pipe.hget(CALLBACK_ATTEMPTS_KEY, f"{record.job_id}:first")
            attempts, _, first = pipe.execute()
        # The window runs from the first try, not from the job's end: callbacks that waited
        # for a gateway to come up still get their retries.
        next_try = now + min(2 ** (attempts - 1), MAX_BACKOFF_S)
        if next_try > float(first) + self.retry_for_s:
            log.error("callback of job %s given up after %d attempts (%s)", record.job_id, attempts, failure)
            self._forget(record.job_id)
            return
        log.warning("callback of job %s failed (%s); attempt %d, next in %.0fs", record.job_id, failure,
                    attempts + 1, next_try - time.time())
        redis.zadd(CALLBACKS_KEY, {record.job_id: next_try}, xx=True)

    def _forget(self, job_id: str) -> None:
        with self.client.store.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(CALLBACKS_KEY, job_id).hdel(CALLBACK_ATTEMPTS_KEY, job_id, f"{job_id}:first").execute()
