"""A network partition of one worker host loses nothing.

Several hosts on one machine (tests/support/netns.py): the root network namespace is the server host
(a private Redis, and RabbitMQ reached through socat forwarders), two network namespaces are worker
hosts, each running a real worker. While the workers run a batch, the host of the worker running more
of it is cut off, for longer than LIVENESS_TTL_S and the AMQP heartbeat, then brought back. Proved, on
both brokers:

- the other worker takes over the cut-off worker's jobs and finishes them while it is cut off
  (RabbitMQ hands back the messages of a connection whose heartbeats stopped; with the queue in
  Redis, the reconciler hands back the messages of a consumer whose heartbeat lapsed), and every
  job ends ``succeeded``: none is lost;
- each job has one final record, written once: the workers' logs show one written final status
  per job, and the metrics count each job once;
- the cut-off worker, back on the network, ends its stale run of each of its jobs (succeeded, or
  timed_out where the job's deadline passed during the cut), and every one of those final writes is
  refused, the record being final already: no final record is overwritten, and no job has a second,
  different final status written.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
from collections import defaultdict

import pytest
import redis

from producer.client import Client
from jobqueue.protocol import JobRecord, JobStatus
from jobqueue.settings import QueueSettings
from tests.conftest import BOTH_BROKERS, WORKER_START_TIMEOUT_S, WorkerProcess, start_worker
from tests.support.netns import Forwarder, Host, NamespacesRefused, make_hosts
from tests.test_worker_faults import wait_for

pytestmark = [pytest.mark.slow, BOTH_BROKERS]

FAULT_APP = "tests.support.fault_app"
JOBS = 6
#: The cut lasts past LIVENESS_TTL_S (10 s by default; the workers' AMQP heartbeat is a third of it,
#: and RabbitMQ gives a silent connection up after two to three of them) ...
MIN_CUT_S = 25
#: ... and until the other worker has finished every job. A host back while the other worker still
#: runs its jobs is refused by the jobs' claims (JobStore.put's runner; tests/test_tasks.py).
MAX_CUT_S = 90
WAIT_S = 120

#: What save_final (jobqueue/outcome.py) logs: a final record written, or not written because the
#: stored record is already final (jobqueue/record/lua.py, FINAL_SCRIPT: the first final status wins).
WRITTEN = re.compile(r"job=(\S+) status=(\w+) label=")
REFUSED = re.compile(r"job=(\S+) ran again and ended (\w+); not written")


@pytest.fixture
def hosts():
    """Two worker hosts; deleting their namespaces at the end removes their veth pairs too."""
    try:
        made = make_hosts(f"qa{os.getpid()}", 2)
    except NamespacesRefused as err:
        pytest.skip(f"cannot make network namespaces: {err}")
    yield made
    for host in made:
        host.delete()


@pytest.fixture
def reachable_redis(private_redis, hosts):
    """The private Redis (127.0.0.1), also listening on the server's address on each host's link."""
    server = redis.Redis.from_url(private_redis.url)
    try:
        server.config_set("bind", " ".join(["127.0.0.1", *(host.server_address for host in hosts)]))
        # Without a password, protected mode answers connections from other hosts with DENIED.
        server.config_set("protected-mode", "no")
    finally:
        server.close()
    return private_redis


@pytest.fixture
def forwarders(hosts, broker_url):
    """RabbitMQ listens on 127.0.0.1 only: socat forwards its port from each host's link. AMQP
    heartbeats cross the forwarder, so RabbitMQ still notices a cut-off worker."""
    if broker_url is not None and shutil.which("socat") is None:
        pytest.skip("socat is not installed: the workers' hosts cannot reach RabbitMQ")
    started: list[Forwarder] = []
    try:
        if broker_url is not None:
            target = urllib.parse.urlsplit(broker_url)
            port = target.port or 5672
            for host in hosts:
                started.append(Forwarder(host.server_address, port, f"{target.hostname}:{port}").start())
        yield started
    finally:
        for forwarder in started:
            forwarder.stop()


def _through(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (credentials, port and path kept)."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + address + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture
def workers(hosts, reachable_redis, forwarders, broker_url, tiny_model_dir, tmp_path):
    """A real worker on each host, reaching Redis and RabbitMQ over its host's link; default
    settings otherwise (LIVENESS_TTL_S 10, JOB_TIMEOUT_S 30)."""
    started: list[WorkerProcess] = []
    try:
        for number, host in enumerate(hosts, 1):
            # The result cache off, as in worker_env: every job runs the model.
            env = {"REDIS_URL": _through(reachable_redis.url, host.server_address),
                   "BROKER_URL": _through(broker_url, host.server_address) if broker_url else "",
                   "MODEL": str(tiny_model_dir), "TORCH_THREADS": "1", "CACHE_TTL_S": "0"}
            started.append(start_worker(FAULT_APP, tmp_path / f"w{number}.log", env, wait_loaded=False,
                                        name=f"part-w{number}", prefix=host.command_prefix()))
        for worker in started:  # both load at once
            worker.wait_for_log("ready.", WORKER_START_TIMEOUT_S)
            worker.wait_for_log(" loaded (dtype=", WORKER_START_TIMEOUT_S)
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
def client(reachable_redis, broker_url):
    """The producer, on the server host: Redis and RabbitMQ on 127.0.0.1."""
    made = Client(settings=QueueSettings(redis_url=reachable_redis.url, broker_url=broker_url))
    yield made
    made.close()


def _submit(client: Client, number: int) -> str:
    # Each decoding step sleeps 0.05 s (tests/support/fault_app.py): a batch runs for seconds.
    return client.submit(f"[[slow=0.05]] 第{number}单 太慢了", max_new_tokens=60, temperature=0.0)


def _running(client: Client, jobs: list[str]) -> list[JobRecord] | None:
    """The jobs' records once all of them run and a batch is mid-way (a sentiment known)."""
    records = client.get_many(jobs)
    if all(r.status is JobStatus.RUNNING for r in records) and any(r.sentiment for r in records):
        return records
    return None


def _cut_until_final(host: Host, client: Client, jobs: list[str]) -> tuple[float, dict[str, JobRecord]]:
    """Cut ``host`` off until every job is final, MIN_CUT_S at least; the cut's length and the
    records as they were while it lasted."""
    return _cut_until(host, client, jobs,
                      lambda records, elapsed: all(r.status.is_final for r in records) and elapsed >= MIN_CUT_S)


def _cut_until(host: Host, client: Client, jobs: list[str], done) -> tuple[float, dict[str, JobRecord]]:
    """Cut ``host`` off until ``done(records, seconds into the cut)``; the cut's length and the records."""
    started = time.monotonic()
    host.cut()
    try:
        while True:
            records = {r.job_id: r for r in client.get_many(jobs)}
            elapsed = time.monotonic() - started
            if done(list(records.values()), elapsed):
                return elapsed, records
            if elapsed > MAX_CUT_S:
                statuses = {job_id: r.status.value for job_id, r in records.items()}
                pytest.fail(f"not done {MAX_CUT_S}s into the cut: {statuses}")
            time.sleep(0.5)
    finally:
        host.restore()


def _final_writes(*workers: WorkerProcess) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per job, the final statuses the workers logged as written, and those refused (already final)."""
    written: dict[str, list[str]] = defaultdict(list)
    refused: dict[str, list[str]] = defaultdict(list)
    for worker in workers:
        log = worker.log()
        for job_id, status in WRITTEN.findall(log):
            written[job_id].append(status)
        for job_id, status in REFUSED.findall(log):
            refused[job_id].append(status)
    return dict(written), dict(refused)


def _tasks_ended(worker: WorkerProcess) -> bool:
    """Whether every task the worker received has ended (succeeded, raised, retried or rejected)."""
    log = worker.log()
    received = set(re.findall(r"Task \S+\[(\S+)\] received", log))
    ended = {job_id for job_id, what in re.findall(r"Task \S+\[(\S+)\] (\S+)", log) if what != "received"}
    return received <= ended


def _as_json(records: dict[str, JobRecord]) -> dict[str, str]:
    return {job_id: record.to_json() for job_id, record in records.items()}


def _assert_one_final_each(client: Client, workers: list[WorkerProcess], final: dict[str, JobRecord]) -> None:
    """Across both workers' logs, each job's final status was written once, and it is the record's:
    no job has a second, different final status (the metrics count each job once, too)."""
    written, _ = _final_writes(*workers)
    assert written == {job_id: [record.status.value] for job_id, record in final.items()}
    assert client.read_metrics().jobs_by_status == {JobStatus.SUCCEEDED.value: len(final)}


def test_a_partitioned_worker_host_loses_nothing(hosts, workers, client, figures, broker):
    jobs = [_submit(client, number) for number in range(JOBS)]
    running = wait_for(lambda: _running(client, jobs), timeout=90, interval=0.02)
    # Which worker's parent gets the first message is a race: the worker running more of the jobs
    # is cut off, so the takeover covers its delivered job and the jobs its batch took.
    held = [{r.job_id for r in running if r.worker.startswith(worker.name)} for worker in workers]
    cut = 0 if len(held[0]) >= len(held[1]) else 1
    victim, other = workers[cut], workers[1 - cut]
    cut_at = time.time()
    cut_s, final = _cut_until_final(hosts[cut], client, jobs)
    # Back on the network, the cut-off worker ends its stale batch; only then are its writes all in.
    wait_for(lambda: _tasks_ended(victim), timeout=WAIT_S, interval=0.2)
    after = {r.job_id: r for r in client.get_many(jobs)}
    # What the cut-off worker's stale run ended its jobs with; refused, the records already final. A
    # job whose sentiment write hung in the cut ends timed_out there: its deadline passed meanwhile.
    _, refused_on_return = _final_writes(victim)
    stale_ends = [status for statuses in refused_on_return.values() for status in statuses]
    taken_over = {job_id for job_id in held[cut] if final[job_id].worker.startswith(other.name)}
    figures.update(broker=broker, jobs=len(jobs), cut_off=f"w{cut + 1}", cut_s=round(cut_s, 1),
                   cut_off_ran=len(held[cut]), taken_over=len(taken_over),
                   lost=sum(r.status is not JobStatus.SUCCEEDED for r in after.values()),
                   all_final_s=round(max(r.finished_at for r in final.values()) - cut_at, 1),
                   refused_on_return=len(stale_ends),
                   refused_timed_out=stale_ends.count(JobStatus.TIMED_OUT.value))
    assert {job_id: r.status for job_id, r in after.items()} == dict.fromkeys(jobs, JobStatus.SUCCEEDED)
    assert taken_over == held[cut], "the other worker did not finish every job of the cut-off one"
    _assert_one_final_each(client, workers, final)
    # The cut-off worker came back and ran each of its jobs to the end of its stale run: every final
    # write was refused, and no record changed.
    assert set(refused_on_return) >= held[cut], victim.log()[-3000:]
    assert _as_json(after) == _as_json(final)

