"""One Redis poller for every open event stream, and a cached worker ping for /healthz.

Each SSE stream used to poll its job's record on its own (a GET every 0.15 s
per stream). ``RecordWatcher`` polls for all of them at once: one MGET of
every watched record per tick, plus the queue depth and the waiting jobs' places
in line at most once a second, in one task on the event loop, with the
Redis call in a worker thread. A stream awaits the next tick and reads the
record it cares about. Streams are counted, and ``MAX_EVENT_STREAMS`` caps
them (``StreamsFull``), and ``MAX_EVENT_STREAMS_PER_TENANT`` caps each tenant's
(``TenantStreamsFull``), so one key cannot hold every stream.

``CachedPing`` keeps Celery's worker ping off the request path: /healthz
answers from the last ping (at most ``max_age_s`` old); when that is stale one
ping runs for every caller waiting on it, in one thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from producer.client import Client
from jobqueue.protocol import JobRecord

#: How often the watched records are read: fast enough for a reply that grows every ~0.25 s.
POLL_INTERVAL_S = 0.15
#: The queue depth is read at most this often.
QUEUE_DEPTH_INTERVAL_S = 1.0
#: An admitted stream that has not started after this long (its client left) frees its place.
ADMISSION_HOLD_S = 5.0


class StreamsFull(Exception):
    """MAX_EVENT_STREAMS streams are open."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"{limit} event streams are open (MAX_EVENT_STREAMS); poll GET /v1/jobs/{{id}} "
                         "or retry the stream later")


class TenantStreamsFull(Exception):
    """The caller's tenant has MAX_EVENT_STREAMS_PER_TENANT streams open."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"this tenant has {limit} event streams open (MAX_EVENT_STREAMS_PER_TENANT); close one, "
                         "poll GET /v1/jobs/{id}, or retry the stream later")


@dataclass
class Snapshot:
    """What one tick read: each watched job's record (None: gone) or the error that stopped the read."""

    records: dict[str, JobRecord | None] = field(default_factory=dict)
    queue_depth: int | None = None
    error: Exception | None = None


class RecordWatcher:
    def __init__(self, client: Client, max_streams: int, max_per_tenant: int = 0):
        self.client = client
        self.max_streams = max_streams
        #: Streams one tenant may hold (0: only max_streams), counted as the whole, per tenant.
        self.max_per_tenant = max_per_tenant
        self._tenants: Counter[str | None] = Counter()
        self._tenant_admitted: dict[str | None, deque[float]] = {}
        self._watched: Counter[str] = Counter()
        #: When each admitted stream that has not started yet passed check_capacity.
        self._admitted: deque[float] = deque()
        self._snapshot = Snapshot()
        self._tick = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._next_depth_read = 0.0

    @property
    def open_streams(self) -> int:
        """Streams running, and those admitted whose first event is not out yet."""
        return sum(self._watched.values()) + len(self._admitted)

    async def check_capacity(self, tenant: str | None = None) -> None:
        """Raise StreamsFull when ``max_streams`` streams are open, TenantStreamsFull when ``tenant``
        has ``max_per_tenant``: before the response starts.

        A FastAPI dependency; async, so it runs on the event loop like the streams' counting.
        The check and the count are one step (no await between them), so a burst of requests
        cannot all pass it: an admitted stream holds its place until it starts (``watch``),
        or for ``ADMISSION_HOLD_S`` if it never does (the client left first).
        """
        now = time.monotonic()
        while self._admitted and self._admitted[0] <= now - ADMISSION_HOLD_S:
            self._admitted.popleft()
        if self.open_streams >= self.max_streams:
            raise StreamsFull(self.max_streams)
        own = self._tenant_admitted.setdefault(tenant, deque())
        while own and own[0] <= now - ADMISSION_HOLD_S:
            own.popleft()
        if self.max_per_tenant and self._tenants[tenant] + len(own) >= self.max_per_tenant:
            raise TenantStreamsFull(self.max_per_tenant)
        self._admitted.append(now)
        own.append(now)

    def watch(self, job_id: str, tenant: str | None = None) -> None:
        """Count one more stream of ``job_id`` (from inside the stream, which takes over the
        place its admission held); ``unwatch`` when it ends."""
        if self._admitted:
            self._admitted.popleft()
        if self._tenant_admitted.get(tenant):
            self._tenant_admitted[tenant].popleft()
        self._tenants[tenant] += 1
        self._watched[job_id] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def unwatch(self, job_id: str, tenant: str | None = None) -> None:
        self._tenants[tenant] -= 1
        if self._tenants[tenant] <= 0:
            del self._tenants[tenant]
        self._watched[job_id] -= 1
        if self._watched[job_id] <= 0:
            del self._watched[job_id]

    async def next_snapshot(self) -> Snapshot:
        """Wait for the next tick's reads."""
        async with self._tick:
            await self._tick.wait()
            return self._snapshot

    async def _poll(self) -> None:
        while self._watched:
            await asyncio.sleep(POLL_INTERVAL_S)
            ids = list(self._watched)
            read_depth = time.monotonic() >= self._next_depth_read
            try:
                snapshot = await run_in_threadpool(self._read, ids, read_depth)
            except Exception as err:  # BrokerUnavailable, an unreadable record: each stream says so
                snapshot = Snapshot(error=err)
            if read_depth and snapshot.error is None:
                self._next_depth_read = time.monotonic() + QUEUE_DEPTH_INTERVAL_S
            async with self._tick:
                self._snapshot = snapshot
                self._tick.notify_all()

    def _read(self, ids: list[str], read_depth: bool) -> Snapshot:
        records = self.client.get_many(ids)
        depth = None
        if read_depth:  # and the queued jobs' places in line, from the same once-a-second read
            depth = self.client.queue_depth()
            self.client.place_in_line([r for r in records if isinstance(r, JobRecord)])
        return Snapshot(records=dict(zip(ids, records)), queue_depth=depth)


class CachedPing:
    """The names of the workers that answered Celery's ping, at most ``max_age_s`` old."""

    def __init__(self, ping: Callable[[], list[str]], max_age_s: float):
        self._ping = ping
        self.max_age_s = max_age_s
        self._answer: tuple[float, list[str]] | None = None
        self._running: asyncio.Task | None = None

    async def workers(self) -> list[str]:
        if self._answer is not None and time.monotonic() - self._answer[0] < self.max_age_s:
            return self._answer[1]
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self) -> list[str]:
        workers = await run_in_threadpool(self._ping)
        self._answer = (time.monotonic(), workers)
        return workers
