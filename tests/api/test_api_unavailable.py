"""What the gateway answers when it cannot serve: no worker, a full queue, a wrong API key, no Redis.

These gateways run against a private redis-server with no worker, so jobs stay
queued and the queue can be filled without disturbing the shared test database.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import redis

from jobqueue.protocol import FINISHED_RECENTLY_KEY, LINE_KEY, QUEUE_NAME, job_key, new_job_id
from tests.api.conftest import read_events, start_gateway
from tests.conftest import _free_port
from tests.fault.conftest import PrivateRedis

pytestmark = pytest.mark.slow

MAX_QUEUE = 2
KEY = {"X-API-Key": "s3cret-key-0123456789"}
EVENTS_TIMEOUT_S = 1.5
MAX_EVENT_STREAMS = 2


@pytest.fixture(scope="module")
def guarded(lonely_redis, tmp_path_factory):
    """A gateway with an API key, a tiny queue and a short events timeout; no worker anywhere."""
    env = {"REDIS_URL": lonely_redis.url, "MAX_QUEUE": str(MAX_QUEUE), "API_KEY": KEY["X-API-Key"],
           "EVENTS_TIMEOUT_S": str(EVENTS_TIMEOUT_S), "MAX_EVENT_STREAMS": str(MAX_EVENT_STREAMS)}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "guarded-gateway.log")
    yield gateway
    gateway.stop()


@pytest.fixture
def http(guarded, lonely_redis):
    # Each test starts with an empty queue, and no finished job (no service rate, no ETA).
    # The lane is emptied as a purge would; its place-in-line index goes with it (a purge outside the
    # service leaves the index to the reconciler, which no worker runs here).
    client = redis.Redis.from_url(lonely_redis.url)
    client.delete(QUEUE_NAME, FINISHED_RECENTLY_KEY, *client.keys(f"{LINE_KEY}*"))
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        yield client


def submit(http, text="你好") -> str:
    response = http.post("/v1/jobs", json={"text": text}, headers=KEY)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}])
def test_v1_without_the_right_api_key_is_401(http, headers):
    job_id = submit(http)
    for response in (http.post("/v1/jobs", json={"text": "你好"}, headers=headers),
                     http.get(f"/v1/jobs/{job_id}", headers=headers),
                     http.get(f"/v1/jobs/{job_id}/events", headers=headers)):
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "unauthorized"
    assert http.get(f"/v1/jobs/{job_id}", headers=KEY).status_code == 200


def test_probes_and_the_page_need_no_api_key(http):
    assert http.get("/healthz").status_code != 401
    assert http.get("/metrics").status_code == 200
    assert http.get("/").status_code == 200


def test_full_queue_is_503_with_retry_after_and_enqueues_nothing(http, lonely_redis):
    for _ in range(MAX_QUEUE):
        submit(http)
    response = http.post("/v1/jobs", json={"text": "再来一个"}, headers=KEY)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    body = response.json()
    assert body["code"] == "queue_full" and f"MAX_QUEUE={MAX_QUEUE}" in body["message"]
    assert redis.Redis.from_url(lonely_redis.url).llen(QUEUE_NAME) == MAX_QUEUE


def test_healthz_is_503_when_no_worker_answers(http):
    submit(http)
    response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "redis": "ok", "workers": [], "queue_depth": 1}


def test_healthz_never_holds_the_request_threads(guarded, http, figures):
    # Each /healthz used to hold a request thread for the whole ping (1 s); 60 at once
    # took every thread and a /v1 read behind them waited. Now one ping serves them all.
    job_id = submit(http)
    answers: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        probes = [pool.submit(lambda: httpx.get(f"{guarded.url}/healthz", timeout=30).status_code)
                  for _ in range(60)]
        time.sleep(0.2)  # the probes are in
        started = time.monotonic()
        read = http.get(f"/v1/jobs/{job_id}", headers=KEY)
        read_s = time.monotonic() - started
        answers = [probe.result() for probe in probes]
    figures.update(healthz_calls=len(answers), v1_read_ms=round(read_s * 1000))
    assert read.status_code == 200
    assert answers == [503] * 60  # no worker: unavailable, and answered
    assert read_s < 0.9  # less than one ping: it did not queue behind them


def test_event_streams_past_max_event_streams_get_503(http):
    job_id = submit(http)
    path = f"/v1/jobs/{job_id}/events"
    with http.stream("GET", path, headers=KEY) as first, http.stream("GET", path, headers=KEY) as second:
        # Kept: an iterator that is dropped closes its stream.
        first_lines, second_lines = first.iter_lines(), second.iter_lines()
        assert next(first_lines) == next(second_lines) == "event: status"  # both counted
        third = http.get(path, headers=KEY)
    assert third.status_code == 503 and third.headers["retry-after"] == "5"
    assert third.json()["code"] == "too_many_streams" and "MAX_EVENT_STREAMS" in third.json()["message"]
    time.sleep(0.5)  # the closed streams end at their next tick
    assert [e.name for e in read_events(http, path, headers=KEY)][-1] == "timeout"


def test_events_of_a_waiting_job_show_the_queue_then_time_out(http):
    submit(http)
    job_id = submit(http)
    started = time.monotonic()
    events = read_events(http, f"/v1/jobs/{job_id}/events", headers=KEY)
    assert [(event.name, event.data) for event in events] == [
        ("status", {"status": "queued"}),
        ("queue", {"queue_depth": 2, "queue_position": 2, "eta_s": None}),  # no job finished: no rate
        ("timeout", {"status": "queued", "after_s": EVENTS_TIMEOUT_S}),
    ]
    assert EVENTS_TIMEOUT_S <= time.monotonic() - started < EVENTS_TIMEOUT_S + 2


def test_events_end_with_an_error_when_the_record_disappears(http, lonely_redis):
    job_id = submit(http)
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=KEY) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: status"
        redis.Redis.from_url(lonely_redis.url).delete(job_key(job_id))
        rest = list(lines)
    assert "event: error" in rest
    assert any(line.startswith("data: ") and '"not_found"' in line for line in rest)


def test_an_unreadable_record_is_500_and_ends_the_stream(http, lonely_redis):
    job_id = submit(http)
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=KEY) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: status"
        redis.Redis.from_url(lonely_redis.url).set(job_key(job_id), b"{not a record")
        rest = list(lines)
    assert "event: error" in rest and any('"unreadable_record"' in line for line in rest)
    got = http.get(f"/v1/jobs/{job_id}", headers=KEY)
    assert got.status_code == 500 and got.json()["code"] == "unreadable_record"


def test_events_end_with_an_error_when_redis_goes_away(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    gateway = start_gateway({"REDIS_URL": server.url}, tmp_path / "gateway.log")
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            job_id = http.post("/v1/jobs", json={"text": "你好"}).json()["job_id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                lines = response.iter_lines()
                assert next(lines) == "event: status"
                server.kill()
                rest = list(lines)
    finally:
        gateway.stop()
        server.kill()
    assert "event: error" in rest and any('"broker_unavailable"' in line for line in rest)


@pytest.fixture(scope="module")
def orphan(tmp_path_factory):
    """A gateway whose Redis does not answer: nothing listens on its port."""
    env = {"REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "orphan-gateway.log")
    yield gateway
    gateway.stop()


def test_unreachable_redis_is_503_with_retry_after(orphan):
    with httpx.Client(base_url=orphan.url, timeout=30) as http:
        submitted = http.post("/v1/jobs", json={"text": "你好"})
        assert submitted.status_code == 503 and submitted.headers["retry-after"] == "2"
        assert submitted.json()["code"] == "broker_unavailable"
        got = http.get("/v1/jobs/00000000-0000-4000-8000-000000000000")
        assert got.status_code == 503 and got.json()["code"] == "broker_unavailable"
        health = http.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "redis": "unreachable", "workers": [], "queue_depth": None}
        assert http.get("/metrics").status_code == 503


def test_a_burst_of_event_streams_cannot_overshoot_the_cap():
    """Requests that all pass the check before any stream starts still count against the cap."""
    import asyncio

    from producer.api.watch import RecordWatcher, StreamsFull

    async def burst() -> list[bool]:
        watcher = RecordWatcher(client=None, max_streams=MAX_EVENT_STREAMS)

        async def open_stream(n: int) -> bool:
            try:
                await watcher.check_capacity()
            except StreamsFull:
                return False
            await asyncio.sleep(0.01)  # the response starts a moment later
            watcher.watch(f"job-{n}")
            return True

        opened = await asyncio.gather(*(open_stream(n) for n in range(MAX_EVENT_STREAMS + 5)))
        for n, ok in enumerate(opened):
            if ok:
                watcher.unwatch(f"job-{n}")
        if watcher._task is not None:
            await watcher._task
        return opened

    assert sum(asyncio.run(burst())) == MAX_EVENT_STREAMS


def test_delete_cancels_a_queued_job_and_says_409_once_it_is_final(http):
    job_id = submit(http)
    path = f"/v1/jobs/{job_id}"
    first = http.delete(path, headers=KEY)
    assert first.status_code == 202 and first.json()["status"] == "cancelled"
    assert first.json()["error"]["code"] == "cancelled"
    again = http.delete(path, headers=KEY)
    assert again.status_code == 409 and again.json()["status"] == "cancelled"  # the final record
    assert http.delete(f"/v1/jobs/{new_job_id()}", headers=KEY).status_code == 404
    assert http.delete(path).status_code == 401
    events = read_events(http, f"{path}/events", headers=KEY)
    assert [e.name for e in events][-1] == "done" and events[-1].data["status"] == "cancelled"
    assert 'qwen_allinone_jobs_total{status="cancelled"}' in http.get("/metrics").text
