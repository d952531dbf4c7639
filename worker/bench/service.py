"""Drive the real service: worker subprocesses on a real Redis, N concurrent producers.

Nothing is simulated: jobs go through ``producer.Client`` and ``celery -A
worker.app worker`` exactly as in production; every figure comes from the
job records the workers wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

from producer import Client
from jobqueue.protocol import JobRecord, JobStatus
from jobqueue.settings import QueueSettings

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Workers:
    """``count`` worker processes with ``threads`` torch threads each."""

    processes: list[subprocess.Popen]
    logs: list[Path]
    start_s: float

    def pool_pids(self) -> list[int]:
        pids = []
        for process in self.processes:
            try:
                pids += [child.pid for child in psutil.Process(process.pid).children()]
            except psutil.NoSuchProcess:
                pass
        return pids

    def rss_bytes(self) -> int:
        """Resident memory of the model-holding pool processes (the parents hold no model)."""
        return rss_of(self.pool_pids())

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def start_workers(model: str, dtype: str, count: int, threads: int, redis_url: str, timeout_s: float = 600,
                  env: dict[str, str] | None = None, broker_url: str | None = None) -> Workers:
    """Start ``count`` workers; ``env`` adds or overrides worker settings (BATCH_MAX=1, ...)."""
    env = {**os.environ, "MODEL": model, "DTYPE": dtype, "TORCH_THREADS": str(threads), "REDIS_URL": redis_url,
           "BROKER_URL": broker_url or "",
           "JOB_TIMEOUT_S": "300", "RESULT_TTL_S": "7200", "PYTHONUNBUFFERED": "1", **(env or {})}
    logdir = Path(tempfile.mkdtemp(prefix="qwen-allinone-bench-"))
    started = time.perf_counter()
    processes, logs = [], []
    for i in range(count):
        logs.append(logdir / f"worker-{i}.log")
        with open(logs[-1], "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1",
                 "--loglevel", "INFO", "--without-mingle", "--without-gossip", "-n", f"bench{i}-{os.getpid()}@%h"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    workers = Workers(processes, logs, 0.0)
    deadline = time.monotonic() + timeout_s
    while not all(" loaded (dtype=" in log.read_text() and " ready." in log.read_text() for log in logs):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            workers.stop()
            raise RuntimeError(f"a worker did not start; see {logdir}")
        time.sleep(0.2)
    workers.start_s = time.perf_counter() - started
    return workers


def rss_of(pids: list[int]) -> int:
    """Resident memory of the processes ``pids`` names (gone ones count nothing)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """Peak RSS of the processes ``pids()`` names, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.25):
        self.pids, self.interval, self.peak = pids, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return rss_of(self.pids())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(PeakRss):
    """Peak RSS of the workers' model-holding pool processes."""

    def __init__(self, workers: Workers, interval: float = 0.25):
        super().__init__(workers.pool_pids, interval)


@dataclass
class LevelResult:
    concurrency: int
    #: Final records of the jobs that reached a final status while their producer waited.
    records: list[JobRecord]
    wall_s: float
    #: Submissions or waits that raised (QueueFull, BrokerUnavailable, WaitTimeout, ...), by exception name.
    exceptions: Counter = field(default_factory=Counter)
    #: How long each ``Client.submit`` took (ms): the broker's admission, as a producer sees it.
    submit_ms: list[float] = field(default_factory=list)

    @property
    def succeeded(self) -> list[JobRecord]:
        return [r for r in self.records if r.status is JobStatus.SUCCEEDED and not r.truncated]

    @property
    def total(self) -> int:
        return len(self.records) + sum(self.exceptions.values())

    @property
    def errors(self) -> Counter:
        """Every job that did not succeed in full, by cause."""
        causes = Counter(self.exceptions)
        for r in self.records:
            if r.status is not JobStatus.SUCCEEDED:
                causes[r.error.code.value if r.error else r.status.value] += 1
            elif r.truncated:
                causes["truncated"] += 1
        return causes

    @property
    def jobs_per_minute(self) -> float:
        return 60 * len(self.succeeded) / self.wall_s


def run_level(redis_url: str, texts: list[str], concurrency: int, jobs: int, reply_tokens: int,
              desc: str, broker_url: str | None = None) -> LevelResult:
    """``concurrency`` producers, each submitting and waiting for one job at a time, ``jobs`` in all."""
    settings = QueueSettings(redis_url=redis_url, broker_url=broker_url, job_timeout_s=300, queue_timeout_s=3600)
    exceptions: Counter = Counter()
    records: list[JobRecord] = []
    submit_ms: list[float] = []
    lock = threading.Lock()
    progress = tqdm(total=jobs, desc=desc, unit="job", leave=False)
    counter = iter(range(jobs))

    def producer() -> None:
        with Client(settings=settings) as client:
            for i in counter:
                try:
                    submitted = time.perf_counter()
                    job_id = client.submit(texts[i % len(texts)], max_new_tokens=reply_tokens,
                                           min_new_tokens=reply_tokens, temperature=0.7)
                    with lock:
                        submit_ms.append(1000 * (time.perf_counter() - submitted))
                    record = client.wait(job_id, timeout=1800)
                except Exception as err:  # counted, reported with its cause
                    with lock:
                        exceptions[type(err).__name__] += 1
                    continue
                with lock:
                    records.append(record)
                progress.update()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(producer) for _ in range(concurrency)]:
            future.result()
    progress.close()
    return LevelResult(concurrency, records, time.perf_counter() - started, exceptions, submit_ms)


def queue_is_empty(redis_url: str, broker_url: str | None = None) -> bool:
    with Client(settings=QueueSettings(redis_url=redis_url, broker_url=broker_url)) as client:
        return client.queue_depth() == 0
