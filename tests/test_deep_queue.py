"""A deep queue (#30): 10,000 waiting jobs of about 2,000 characters and no worker, read by 8 polling
clients, a gateway-like poller, cancels and the reconciler's sweeps, each a process of its own as in
a deployment. No Redis command of theirs may run over 10 ms (SLOWLOG) but a stray few that a
descheduled Redis explains, Client.get's p50 and p99 are printed, and every place in line is exact.

Run alone: ``REDIS_URL=redis://127.0.0.1:6379/15 python -m pytest tests/test_deep_queue.py -s``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import random
import statistics
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from celery import Celery

from jobqueue.protocol import LINE_KEY, QUEUE_NAME, JobStatus
from jobqueue.queue import CELERY_WIRE_CONFIG, QUEUE_TRANSPORT
from jobqueue.queue.reconciler import Reconciler
from jobqueue.queue.transport import lane_keys
from jobqueue.settings import QueueSettings
from jobqueue.store import JobStore
from producer import Client

pytestmark = pytest.mark.slow

DEPTH = 10_000
TEXT_CHARS = 1_990
READERS = 8
READS_PER_READER = 250
#: A polling client's pause between reads: 250 reads then span the sweeps' seconds (6 s or more),
#: 400 reads a second in all.
READ_PAUSE_S = 0.02
CANCELS = 40
#: SLOWLOG's threshold for the test, in microseconds: every command over 10 ms is logged.
SLOW_US = 10_000
#: Entries over SLOW_US allowed, each under STRAY_CEILING_US, for a Redis descheduled mid-command.
MAX_STRAY = 3
STRAY_CEILING_US = 50_000
#: A cancel's removal walks the list to its place: 10 to 14 ms on an AVX2 EPYC at this depth.
CANCEL_CEILING_US = 100_000
#: The clients under test name their connections, so commands of other clients of this Redis
#: server (other databases) are told apart in SLOWLOG.
NAME = "deep-queue-test"
#: How SLOWLOG shows a cancel's removal (jobqueue.queue.line.drop): the line's key, then the first lane.
_DROP_MARK = f" {LINE_KEY} {lane_keys(QUEUE_NAME)[0]} ".encode()


@pytest.fixture
def deep_queue(redis_url, redis_client):
    redis_client.flushdb()
    settings = QueueSettings(redis_url=redis_url, max_queue=DEPTH * 2)
    filler = Client(settings=settings)

    def fill(start: int) -> list[str]:
        return [filler.submit(f"{i:05d} " + "等" * (TEXT_CHARS - 6), priority="bulk" if i % 10 == 0 else "interactive")
                for i in range(start, DEPTH, 4)]

    with ThreadPoolExecutor(4) as pool:
        ids = [job_id for part in pool.map(fill, range(4)) for job_id in part]
    filler.close()
    assert redis_client.llen(QUEUE_NAME) + redis_client.llen(lane_keys(QUEUE_NAME)[-1]) == DEPTH
    yield settings, ids
    redis_client.flushdb()


def _named_client(settings: QueueSettings) -> Client:
    return Client(settings=settings, redis_client=redis.Redis.from_url(settings.redis_url, client_name=NAME))


def _in_process(target, *args):
    """Run ``target(*args)`` in a forked process; its JSON answer, or its error, comes back through
    the pipe."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def run() -> None:
        try:
            answer = {"answer": target(*args)}
        except BaseException:  # noqa: BLE001 - the parent reports it
            answer = {"error": traceback.format_exc()}
        sender.send_bytes(json.dumps(answer).encode())

    process = context.Process(target=run, daemon=True)
    process.start()
    return process, receiver


def _answer(process, receiver, timeout_s: float = 120):
    """The process's answer; fails with its error, its exit code, or after ``timeout_s``."""
    ready = multiprocessing.connection.wait([receiver, process.sentinel], timeout_s)
    assert ready, f"{process.name} gave no answer in {timeout_s} s"
    assert receiver.poll(), f"{process.name} ended with exit code {process.exitcode} and no answer"
    answer = json.loads(receiver.recv_bytes())
    process.join(30)
    assert "error" not in answer, f"{process.name} failed:\n{answer.get('error')}"
    return answer["answer"]


def _stop(processes) -> None:
    """End whatever is still running (after a failure), so nothing writes to the database after the test."""
    for process, _ in processes:
        if process.is_alive():
            process.terminate()
        process.join(10)


def _reader(settings: QueueSettings, ids: list[str], seed: int) -> list[float]:
    """One polling client: READS_PER_READER reads of random jobs, READ_PAUSE_S apart; their times in ms."""
    rng, latencies = random.Random(seed), []
    with _named_client(settings) as client:
        for _ in range(READS_PER_READER):
            started = time.perf_counter()
            record = client.get(rng.choice(ids))
            latencies.append((time.perf_counter() - started) * 1000)
            assert record is not None
            time.sleep(READ_PAUSE_S)
    return latencies


def _poller(settings: QueueSettings, ids: list[str], stop) -> int:
    """What the gateway's poller does for 100 open event streams, every 0.15 s; how many polls."""
    polls = 0
    with _named_client(settings) as client:
        while not stop.is_set():
            records = client.get_many(ids[:100])
            client.queue_depth()
            client.place_in_line([r for r in records if r is not None])
            polls += 1
            time.sleep(0.15)
    return polls


def _sweeps(settings: QueueSettings, stop) -> list[dict]:
    """A worker's reconciler, sweeping every 0.5 s until stopped and two passes are done; its reports."""
    app = Celery("deep-queue-sweeps", set_as_current=False)
    app.conf.update(CELERY_WIRE_CONFIG, broker_url=settings.redis_url, broker_transport=QUEUE_TRANSPORT)
    named = redis.Redis.from_url(settings.redis_url, client_name=NAME)
    sweeper = Reconciler(app, JobStore(named, 60), grace_s=1.0, interval_s=0.2, max_attempts=3)
    reports = []
    try:
        while (not stop.is_set() or len(reports) < 12) and len(reports) < 100:  # two passes or more
            report = sweeper.sweep()
            reports.append(dataclasses.asdict(report) if report is not None else None)
            time.sleep(0.5)
    finally:
        sweeper.close()
        app.close()
    return reports


def test_reads_of_a_deep_queue_cost_the_same_as_of_a_short_one(deep_queue, redis_client, figures):
    settings, ids = deep_queue
    threshold = redis_client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    redis_client.config_set("slowlog-log-slower-than", SLOW_US)
    redis_client.slowlog_reset()
    cancelled = ids[100::DEPTH // CANCELS][:CANCELS]  # from near the front to the back
    stop = multiprocessing.get_context("fork").Event()
    background, readers = [], []
    try:
        background += [_in_process(_poller, settings, ids, stop), _in_process(_sweeps, settings, stop)]
        readers += [_in_process(_reader, settings, ids, seed) for seed in range(READERS)]
        with _named_client(settings) as canceller:
            for job_id in cancelled:
                assert canceller.cancel(job_id).status is JobStatus.CANCELLED
        latencies = [ms for reader in readers for ms in _answer(*reader)]
        stop.set()
        polls, reports = (_answer(*process) for process in background)
        logged = [entry for entry in redis_client.slowlog_get(128)
                  if (entry.get("client_name") or b"") in (NAME, NAME.encode())]
    finally:
        stop.set()
        _stop(background + readers)
        redis_client.config_set("slowlog-log-slower-than", threshold)

    # The target covers reads, streams and sweeps. A cancel's removal of its message walks the
    # list to its place (LREM, in C), which on an AVX2 EPYC took 10 to 14 ms for jobs deep in this
    # queue of 2 KB messages: counted apart, and in RELIABILITY.md's known limits.
    slow = [entry for entry in logged if _DROP_MARK not in entry["command"]]
    slow_cancels = len(logged) - len(slow)
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), cuts[98]
    print(f"\ndeep queue: {DEPTH} jobs of {TEXT_CHARS} chars, {len(latencies)} Client.get from {READERS} processes: "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(latencies):.2f} ms; polls {polls}, sweeps {len(reports)}; "
          f"commands over {SLOW_US // 1000} ms: {len(slow)}, and {slow_cancels} of the {CANCELS} cancels")
    for entry in logged:
        print("  slow:", entry["duration"], "us", entry["command"][:200])
    figures.update({"jobs": DEPTH, "reads": len(latencies), "get p50 ms": round(p50, 2),
                    "get p99 ms": round(p99, 2), "commands over 10 ms": len(slow),
                    "cancels over 10 ms": slow_cancels})
    # Redis shares the machine's two cores with the test's eleven processes and the rest of CI: a
    # command it is descheduled in is logged too (one run logged TIME, which is O(1), at 28 ms). A
    # read that scans the queue ran 235 ms to seconds, and every poll logged it (56 entries a minute
    # before #30); a stray entry or three under 50 ms is the scheduler's.
    assert len(slow) <= MAX_STRAY and all(entry["duration"] < STRAY_CEILING_US for entry in slow), slow
    assert all(entry["duration"] < CANCEL_CEILING_US for entry in logged)
    # The target is 10 ms, a figure of RELIABILITY.md's (3.5 to 4.9 ms on an AVX-512 EPYC,
    # where the readers as threads of one process, three round trips a read, redis-py's own parser
    # and messages twice the size made it 21 ms), not a bound for a timed test on CI's shared
    # cores: held here to what rules out a scan of the queue (2,300 ms before #30).
    assert p99 <= 100.0
    assert polls > 0 and all(not (r["resent"] or r["finished"] or r["restored"]) for r in reports if r is not None)
    _assert_places_are_exact(redis_client, settings, set(cancelled))


def _assert_places_are_exact(redis_client, settings: QueueSettings, cancelled: set[str]) -> None:
    """Every waiting job's queue_position is its place in the lanes, read whole (after the timing)."""
    in_line = [json.loads(raw)["headers"]["id"] for lane in lane_keys(QUEUE_NAME)
               for raw in reversed(redis_client.lrange(lane, 0, -1))]
    assert len(in_line) == DEPTH - len(cancelled) and not cancelled & set(in_line)
    with Client(settings=settings) as client:
        records = client.get_many(in_line)
        client.place_in_line(records)
    assert [r.queue_position for r in records] == list(range(1, len(in_line) + 1))
