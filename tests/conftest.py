"""Shared fixtures: a real Redis database, a tiny Qwen2 model, real Celery workers.

REDIS_URL defaults to redis://127.0.0.1:6379/15; only that database is
flushed. Where nothing answers there, a private redis-server is started on a
free port if the binary is installed; otherwise the session fails with one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from producer.client import Client
from jobqueue.settings import QueueSettings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"
WORKER_START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


_FIGURES: dict[str, dict[str, object]] = {}


@pytest.fixture
def figures(request):
    """A dict a fault test fills with what it did (jobs, kills, lost, RSS, ...).

    The rows are printed at the end of the run; RELIABILITY.md quotes them.
    """
    row: dict[str, object] = {}
    _FIGURES[request.node.name] = row
    return row


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, row in _FIGURES.items():
        if row:
            shown = ", ".join(f"{key}={value}" for key, value in row.items())
            terminalreporter.write_line(f"{name}: {shown}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("REDIS_URL", DEFAULT_TEST_REDIS_URL)
    server = None
    if not _answers(url):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(f"no Redis answers at {url} and redis-server is not installed", pytrace=False)
        port = _free_port()
        workdir = tmp_path_factory.mktemp("redis")
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/15"
        deadline = time.monotonic() + 10
        while not _answers(url):
            if time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"started redis-server on port {port} but it does not answer", pytrace=False)
            time.sleep(0.1)
    # Flushed once, before any worker binds its queue: flushing later would
    # remove Celery's routing keys from under a running worker.
    redis.Redis.from_url(url).flushdb()
    yield url
    if server is not None:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def require_llama_cpp() -> None:
    """Skip a llama.cpp test where the [llama] extra is not installed; CI (REQUIRE_LLAMA_CPP=1) fails instead."""
    from worker.engine.model_source import llama_cpp_installed

    if not llama_cpp_installed():
        message = "llama-cpp-python is not installed (pip install -e '.[llama]')"
        if os.environ.get("REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a float32 GGUF file, the way llama.cpp lays out Qwen2."""
    from tests.support.tiny_model import write_tiny_gguf

    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.support.tiny_model import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def rabbitmq_url():
    """A RabbitMQ vhost of this run's own on TEST_RABBITMQ (default 127.0.0.1:5672, guest/guest),
    made with rabbitmqctl and deleted, with everything in it, at the end."""
    from tests.support.rabbitmq import TestVhost

    vhost = TestVhost.create(os.environ.get("TEST_RABBITMQ", "127.0.0.1:5672"))
    yield vhost.url
    vhost.delete()


@pytest.fixture(scope="module")
def broker(request) -> str:
    """Where this module's queue lives: ``redis`` unless the module parametrizes it
    (``pytestmark = BOTH_BROKERS``)."""
    return getattr(request, "param", "redis")


@pytest.fixture(scope="module")
def broker_url(broker, request) -> str | None:
    """BROKER_URL for this module's workers and clients (None: the queue in Redis). The RabbitMQ
    queue is deleted first: an earlier module may have declared it with another MAX_QUEUE."""
    if broker == "redis":
        return None
    from tests.support.rabbitmq import delete_job_queue

    url = request.getfixturevalue("rabbitmq_url")
    delete_job_queue(url)
    return url


#: Runs every test of a module once per broker: ``pytestmark = [pytest.mark.slow, BOTH_BROKERS]``.
BOTH_BROKERS = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True, scope="module")


@pytest.fixture
def make_client(redis_url, broker_url):
    """Client factory; keyword arguments override QueueSettings fields."""
    clients = []

    def make(**overrides) -> Client:
        client = Client(settings=QueueSettings(**{"redis_url": redis_url, "broker_url": broker_url, **overrides}))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def raw_sender(redis_url):
    """A Celery app that sends anything straight into the queue, bypassing the client's validation."""
    from celery import Celery

    from jobqueue.queue import CELERY_WIRE_CONFIG

    app = Celery("raw-sender", broker=redis_url, set_as_current=False)
    app.conf.update(CELERY_WIRE_CONFIG)
    yield app
    app.close()


@dataclass
class WorkerProcess:
    """A real ``celery worker`` subprocess and its log file."""

    process: subprocess.Popen
    log_path: Path
    #: Job records name their worker ``<name>-<pytest pid>@<host>``; this is that up to the ``@``.
    name: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_child_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def pool_rss_bytes(self) -> int:
        import psutil

        return sum(psutil.Process(pid).memory_info().rss for pid in self.pool_child_pids())

    def kill_all(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crashed container would be."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def wait_for_log(self, needle: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(needle) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the worker log after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill_all()


def start_worker(
    app: str, log_path: Path, env: dict[str, str], *, wait_loaded: bool = True, name: str = "test",
    prefix: Sequence[str] = (),
) -> WorkerProcess:
    """``prefix``: a command that execs the worker (``ip netns exec <ns>``: it runs on another host),
    so its pid and process group are the worker's."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    log_file = open(log_path, "a")
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "celery", "-A", app, "worker", "--concurrency", "1",
         "--loglevel", "INFO", "--without-mingle", "--without-gossip", "-n", f"{name}-{os.getpid()}@%h"],
        cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a test can kill it whole
    )
    log_file.close()
    worker = WorkerProcess(process, log_path, f"{name}-{os.getpid()}@")
    if wait_loaded:
        worker.wait_for_log("ready.", WORKER_START_TIMEOUT_S)
        worker.wait_for_log(" loaded (dtype=", WORKER_START_TIMEOUT_S)
    return worker


@pytest.fixture(scope="module")
def worker_env(redis_url, broker_url, tiny_model_dir) -> dict[str, str]:
    # The result cache off: jobs of other tests with the same text must not change what a test
    # sees (a cached sentiment skips the model pass); tests of the cache turn it on.
    return {"REDIS_URL": redis_url, "BROKER_URL": broker_url or "", "MODEL": str(tiny_model_dir),
            "TORCH_THREADS": "1", "CACHE_TTL_S": "0"}


@pytest.fixture(scope="module")
def fault_worker(worker_env, tmp_path_factory):
    """One worker running the production app plus the test fault hooks; hard time limit 6 s
    (no join window: its batches are the jobs that start together)."""
    env = {**worker_env, "JOB_TIMEOUT_S": "5", "TIME_LIMIT_GRACE_S": "1", "JOIN_WINDOW_S": "0"}
    worker = start_worker(
        "tests.support.fault_app", tmp_path_factory.mktemp("logs") / "fault-worker.log", env, name="fault"
    )
    yield worker
    worker.stop()
