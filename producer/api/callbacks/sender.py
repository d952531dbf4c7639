"""The gateway's callback sender: claims due callbacks and runs each attempt as a task of its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from standardwebhooks import Webhook

from producer.api.callbacks.delivery import Refused, send, signed_headers
from producer.api.callbacks.keys import tenant_secret
from producer.api.callbacks.ledger import Ledger
from producer.client import Client
from producer.settings import ApiSettings, tenant_callback_hosts
from jobqueue.callback_hosts import AllowedHosts, callback_target
from jobqueue.errors import UnreadableRecord
from jobqueue.protocol import DEFAULT_CALLBACK_MAX_PENDING, JobRecord, JobStatus

log = logging.getLogger("qwen_allinone.gateway")

POLL_INTERVAL_S = 0.5
#: A claimed callback stays this gateway's for its attempt's deadline plus this: the Redis reads
#: and writes around the attempt fit in it, so the lease never runs out under a running attempt.
LEASE_MARGIN_S = 30.0
#: A callback whose host has no free slot (one queued before its owner was recorded) is due again
#: this much later, not counted as an attempt.
HOST_BUSY_DELAY_S = 1.0


class CallbackSender:
    def __init__(self, client: Client, secret: str, *, hosts: AllowedHosts,
                 tenant_hosts: dict[str, AllowedHosts] | None = None, retry_for_s: float = 600.0,
                 timeout_s: float = 10.0, max_concurrent: int = 32,
                 max_pending: tuple[int, int] = (DEFAULT_CALLBACK_MAX_PENDING, DEFAULT_CALLBACK_MAX_PENDING)):
        self.client = client
        self.secret = secret
        #: tenant -> the Webhook that signs its callbacks (keys.py), made on first use.
        self._webhooks: dict[str | None, Webhook] = {}
        self.hosts, self.tenant_hosts = hosts, tenant_hosts or {}
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        #: One host never holds more than half of the slots: the other half serve everyone else.
        self.per_host = max(1, max_concurrent // 2)
        self.max_pending = max_pending
        self.ledger = Ledger(client.store.redis, lease_s=timeout_s + LEASE_MARGIN_S, retry_for_s=retry_for_s)
        self._running: set[asyncio.Task] = set()
        self._in_flight: Counter[str] = Counter()
        self._redis_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="callbacks")
        self._task: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, client: Client, settings: ApiSettings) -> CallbackSender | None:
        """The gateway's sender, or None without CALLBACK_SECRET (then this gateway sends none)."""
        if settings.callback_secret is None:
            return None
        return cls(client, settings.callback_secret.get_secret_value(), hosts=settings.allowed_callback_hosts,
                   tenant_hosts=tenant_callback_hosts(settings), retry_for_s=settings.callback_retry_for_s,
                   timeout_s=settings.callback_timeout_s, max_concurrent=settings.callback_max_concurrent,
                   max_pending=(settings.callback_max_pending_per_host, settings.callback_max_pending_per_tenant))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [task for task in (self._task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._redis_pool.shutdown(wait=False)

    async def _redis(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._redis_pool, function, *args)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.max_concurrent, max_keepalive_connections=0)
        # trust_env=False: no proxy from the environment stands between the checks and the receiver.
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, limits=limits) as http:
            published = False
            while True:
                try:
                    if not published:
                        await self._redis(self.ledger.publish_limits, *self.max_pending)
                        published = True
                    free = self.max_concurrent - len(self._running)
                    room = {host: self.per_host - busy for host, busy in self._in_flight.items() if busy}
                    for job_id in await self._redis(self.ledger.claim, free, self.per_host, room) if free > 0 else []:
                        task = asyncio.create_task(self._attempt(http, job_id))
                        self._running.add(task)
                        task.add_done_callback(self._running.discard)
                except Exception as err:  # Redis away: try again at the next tick
                    log.warning("callbacks: %s: %s", type(err).__name__, err)
                await asyncio.sleep(POLL_INTERVAL_S)

    async def _attempt(self, http: httpx.AsyncClient, job_id: str) -> None:
        """One attempt, as a task of its own: a slow receiver holds up no other callback."""
        try:
            record = await self._redis(self._record, job_id)
            if record is None:  # expired, nothing to call, or cancelled without callback_on_cancel
                await self._redis(self.ledger.forget, job_id)
                return
            target = callback_target(record.request.callback_url)
            host = target.origin if target is not None else ""
            if self._in_flight[host] >= self.per_host:
                await self._redis(self.ledger.defer, job_id, HOST_BUSY_DELAY_S)
                return
            self._in_flight[host] += 1
            try:
                failure = await self._send(http, record)
            finally:
                self._in_flight[host] -= 1
                if not self._in_flight[host]:
                    del self._in_flight[host]
            await self._redis(self.ledger.forget if failure is None else self.ledger.retry_later,
                              *((job_id,) if failure is None else (job_id, failure)))
        except Refused as err:
            log.error("callback of job %s given up: %s", job_id, err)
            await self._redis(self.ledger.forget, job_id)
        except Exception as err:  # Redis away: the lease runs out and the callback is claimed again
            log.warning("callback of job %s: %s: %s", job_id, type(err).__name__, err)

    async def _send(self, http: httpx.AsyncClient, record: JobRecord) -> str | None:
        body = record.to_json().encode("utf-8")
        headers = signed_headers(self._webhook(record.request.tenant), record.job_id, body, time.time())
        allowed = self.tenant_hosts.get(record.request.tenant, self.hosts)
        return await send(http, record.request.callback_url, allowed, body, headers, self.timeout_s)

    def _webhook(self, tenant: str | None) -> Webhook:
        if tenant not in self._webhooks:
            self._webhooks[tenant] = Webhook(tenant_secret(self.secret, tenant))
        return self._webhooks[tenant]

    def _record(self, job_id: str) -> JobRecord | None:
        """The final record to POST, or None when there is none to send."""
        try:
            record = self.client.get(job_id)
        except UnreadableRecord:
            return None
        if record is None or record.request is None or not record.request.callback_url:
            return None
        if record.status is JobStatus.CANCELLED and not record.request.callback_on_cancel:
            return None  # queued before cancelled jobs stopped queuing callbacks
        return record
