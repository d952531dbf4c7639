"""Fixtures of the gateway tests: a real `uvicorn` gateway, and one real worker shared by the package.

The gateway runs with the command the README documents
(``uvicorn --factory producer.api:create_app``) as a subprocess on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, _free_port, start_worker
from tests.fault.conftest import PrivateRedis

GATEWAY_START_TIMEOUT_S = 30


@dataclass
class Gateway:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start_gateway(env: dict[str, str], log_path: Path) -> Gateway:
    port = _free_port()
    with open(log_path, "a") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "producer.api:create_app",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    gateway = Gateway(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{gateway.log()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{gateway.url}/openapi.json", timeout=2).status_code == 200:
                return gateway
        if time.monotonic() > deadline:
            gateway.stop()
            raise AssertionError(f"gateway did not answer within {GATEWAY_START_TIMEOUT_S}s:\n{gateway.log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="package")
def api_worker(redis_url, tiny_model_dir, tmp_path_factory):
    """One real worker with the tiny model, for every gateway test that runs jobs."""
    # MAX_NEW_TOKENS=1024: the events test needs a reply long enough to watch it being written;
    # HISTORY_MAX_TOKENS then keeps such a reply in a conversation's next prompt (the page test).
    env = {"REDIS_URL": redis_url, "MODEL": str(tiny_model_dir), "TORCH_THREADS": "1", "MAX_NEW_TOKENS": "1024",
           "HISTORY_MAX_TOKENS": "4096", "CACHE_TTL_S": "0"}
    worker = start_worker("worker.app", tmp_path_factory.mktemp("logs") / "api-worker.log", env, name="api")
    yield worker
    worker.stop()


@pytest.fixture(scope="package")
def gateway(redis_url, api_worker, tmp_path_factory) -> Iterator[Gateway]:
    """The gateway in front of the shared worker, with default settings (no API key)."""
    gw = start_gateway({"REDIS_URL": redis_url}, tmp_path_factory.mktemp("logs") / "gateway.log")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def lonely_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    """A private redis-server that no worker serves: jobs stay queued, the queue can be filled."""
    server = PrivateRedis(tmp_path_factory.mktemp("lonely-redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


@dataclass
class Event:
    name: str
    data: dict
    #: time.time() when the test read it, to compare with the worker's timestamps.
    received_at: float


def read_events(http: httpx.Client, path: str, headers: dict[str, str] | None = None,
                comments: list[str] | None = None) -> list[Event]:
    """Read a whole SSE stream (until the server closes it) into events; comments go to ``comments``."""
    events: list[Event] = []
    with http.stream("GET", path, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "message", []
        for line in response.iter_lines():
            if line.startswith(":"):
                if comments is not None:
                    comments.append(line)
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif line == "" and data:
                events.append(Event(name, json.loads("\n".join(data)), time.time()))
                name, data = "message", []
    return events


def wait_final(http: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until the job is final."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        record = response.json()
        if record["status"] not in ("queued", "running"):
            return record
        assert time.monotonic() < deadline, f"job {job_id} still {record['status']} after {timeout}s"
        time.sleep(0.1)
