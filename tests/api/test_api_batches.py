"""POST /v1/batches and friends: all or none (422 naming texts[i], a queue filling part way), the batch's
status, its cancel and tenant isolation on a Redis no worker serves (fast, in process); and one small
batch end to end through the real gateway and worker (slow)."""

from __future__ import annotations

import csv
import io
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from jobqueue.protocol import LINE_KEY, QUEUE_NAME, JobRecord, JobStatus, batch_record_key, job_key
from producer.api import create_app
from producer.settings import ApiSettings
from tests.api.conftest import start_gateway

ACME = {"X-API-Key": "acme-key-0123456789"}
GLOBEX = {"X-API-Key": "globex-key-0123456789"}


@pytest.fixture
def idle(lonely_redis):
    """The lonely Redis, its queue emptied; no worker, so jobs stay queued."""
    client = redis.Redis.from_url(lonely_redis.url)
    client.flushdb()  # a private redis-server of this module only
    yield client
    client.close()


def _app(url: str, **settings) -> TestClient:
    return TestClient(create_app(ApiSettings(redis_url=url, api_keys="acme=acme-key-0123456789,"
                                             "globex=globex-key-0123456789", **settings)))


def test_a_bad_text_refuses_the_whole_batch_naming_its_index(lonely_redis, idle):
    texts = ["好"] * 20
    texts[3], texts[17] = "   ", "长" * 2001
    with _app(lonely_redis.url) as http:
        response = http.post("/v1/batches", json={"texts": texts, "labels": "en"}, headers=ACME)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [problem["loc"] for problem in detail] == [["body", "texts", 3], ["body", "texts", 17]]
    assert detail[0]["msg"] == "texts[3]: must contain non-whitespace text"
    assert detail[1]["msg"] == "texts[17]: must be at most 2000 characters (got 2001)"
    assert idle.llen(QUEUE_NAME) == 0 and not idle.keys(batch_record_key("*")) and not idle.keys(job_key("*"))


@pytest.mark.parametrize("body, where", [
    ({"texts": []}, ["body", "texts"]),
    ({"texts": ["a"] * 6}, ["body", "texts"]),                       # over MAX_BATCH_ITEMS=5
    ({"texts": ["a", 7]}, ["body", "texts", 1]),                      # not a string
    ({"texts": ["a"], "priority": "interactive"}, ["body", "priority"]),  # always bulk
    ({"texts": ["a"], "max_new_tokens": "8"}, ["body", "max_new_tokens"]),
])
def test_malformed_bodies_are_422_never_500(lonely_redis, idle, body, where):
    with _app(lonely_redis.url, max_batch_items=5) as http:
        response = http.post("/v1/batches", json=body, headers=ACME)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == where
    assert idle.llen(QUEUE_NAME) == 0


def test_a_queue_that_fills_part_way_leaves_nothing_of_the_batch(lonely_redis, idle):
    with _app(lonely_redis.url, tenant_max_queue=3) as http:
        response = http.post("/v1/batches", json={"texts": ["一", "二", "三", "四", "五"]}, headers=ACME)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "tenant_queue_full"
        assert "the 3 jobs it had queued were cancelled" in response.json()["message"]
        records = [JobRecord.from_json(idle.get(key)) for key in idle.keys(job_key("*"))]
        assert len(records) == 3 and {r.status for r in records} == {JobStatus.CANCELLED}
        assert idle.zcard(LINE_KEY) == 0 and not idle.keys(batch_record_key("*"))
        # The tenant's share is free again: a batch that fits is taken.
        assert http.post("/v1/batches", json={"texts": ["一", "二", "三"]}, headers=ACME).status_code == 202


def test_status_cancel_and_tenant_isolation(lonely_redis, idle):
    with _app(lonely_redis.url) as http:
        response = http.post("/v1/batches", json={"texts": ["一", "二", "三"], "max_new_tokens": 4}, headers=ACME)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status"] == "queued" and response.headers["location"] == accepted["location"]
        location = accepted["location"]
        records = [JobRecord.from_json(idle.get(key)) for key in idle.keys(job_key("*"))]
        assert {(r.request.priority, r.request.tenant, r.request.options.max_new_tokens) for r in records} == {
            ("bulk", "acme", 4)}

        status = http.get(location, headers=ACME).json()
        assert (status["status"], status["jobs"], status["counts"]) == ("queued", 3, {"queued": 3})
        # Another tenant's batch is "not found", for every route; so is an unknown or malformed id.
        for method, path in [("GET", location), ("GET", f"{location}/results"), ("DELETE", location)]:
            assert http.request(method, path, headers=GLOBEX).status_code == 404
        assert http.get("/v1/batches/00000000-0000-4000-8000-000000000000", headers=ACME).status_code == 404
        assert http.get("/v1/batches/nope", headers=ACME).status_code == 404
        assert http.get(location).status_code == 401

        not_done = http.get(f"{location}/results", headers=ACME)
        assert not_done.status_code == 409 and not_done.json()["code"] == "batch_not_done"

        cancelled = http.delete(location, headers=ACME)
        assert cancelled.status_code == 202, cancelled.text
        assert (cancelled.json()["status"], cancelled.json()["counts"]) == ("cancelled", {"cancelled": 3})
        assert idle.llen(QUEUE_NAME) == 0 and idle.zcard(LINE_KEY) == 0

        rows = list(csv.DictReader(io.StringIO(http.get(f"{location}/results?format=csv", headers=ACME).text)))
        assert [(r["index"], r["text"], r["status"]) for r in rows] == [
            ("0", "一", "cancelled"), ("1", "二", "cancelled"), ("2", "三", "cancelled")]
    assert 0 < idle.ttl(batch_record_key(accepted["batch_id"])) <= 86_400


@pytest.mark.slow
def test_a_small_batch_end_to_end(redis_url, api_worker, tmp_path_factory):
    env = {"REDIS_URL": redis_url, "API_KEYS": "acme=acme-key-0123456789,globex=globex-key-0123456789"}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "batches-gateway.log")
    texts = ["送餐太慢了，菜都凉了", "味道很好，下次还来", "服务一般", "The room was clean.", "差评"]
    try:
        with httpx.Client(base_url=gateway.url, headers=ACME, timeout=30) as http:
            response = http.post("/v1/batches", json={"texts": texts, "max_new_tokens": 4})
            assert response.status_code == 202, response.text
            location = response.json()["location"]
            deadline = time.monotonic() + 120
            while (status := http.get(location).json())["status"] != "succeeded":
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["counts"] == {"succeeded": 5}
            results = http.get(f"{location}/results", params={"format": "csv"})
            assert http.get(location, headers=GLOBEX).status_code == 404
            lines = http.get(f"{location}/results").text.splitlines()
    finally:
        gateway.stop()
    assert results.status_code == 200 and results.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(results.text)))
    assert [row["text"] for row in rows] == texts and [row["index"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert all(row["status"] == "succeeded" and row["label"] and 0 <= float(row["confidence"]) <= 1
               and row["reply"] is not None for row in rows)
    assert len(lines) == 5


def test_batches_have_their_own_body_limit(lonely_redis, idle):
    body = {"texts": ["好" * 2000] * 40}  # about 240 kB: over MAX_BODY_BYTES (64 KiB), under the batch limit
    with _app(lonely_redis.url) as http:
        assert http.post("/v1/batches", json=body, headers=ACME).status_code == 202
        assert http.post("/v1/jobs", json={"text": "好" * 30000}, headers=ACME).status_code == 413
    with _app(lonely_redis.url, max_batch_body_bytes=4096) as http:
        response = http.post("/v1/batches", json=body, headers=ACME)
        assert response.status_code == 413 and response.json()["code"] == "body_too_large"
