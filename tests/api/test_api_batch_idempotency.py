"""Idempotency-Key on POST /v1/batches (#30 items 3 and 4): a retried key answers the same batch and
queues no second set of jobs, also when 100 retries race from 8 threads through a real gateway; another
body under the key is 422 naming it; a gateway that died between the claim and the queueing is taken
over under the same batch id once its lease lapses; a refused batch frees its key.

On the shared Redis (REDIS_URL): each test is a tenant of its own and counts its records, so a worker on
the database would not change what they assert; the tenant's share filled, on a Redis no worker serves.
The retries, the race and the takeover run on both brokers (the claims are in Redis either way; the
jobs' own keys are the broker's submit's); the waits and the tenant's share, which are Redis only, on Redis."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from jobqueue.protocol import JobRequest, JobStatus
from producer.client import Client
from producer.settings import ApiSettings
from tests.api.conftest import start_gateway
from tests.conftest import BOTH_BROKERS
from tests.support.batches import new_tenant, tenant_app, tenant_batches, tenant_records

TEXTS = ["送餐太慢了", "味道很好", "服务一般"]


def _claims():
    """The claims' module parts, imported in the tests that use them (so the others run on any tree)."""
    from jobqueue.batches import BatchClaims, batch_digest
    from jobqueue.protocol import batch_idempotency_key
    from producer.api import batch_submit
    return BatchClaims, batch_digest, batch_idempotency_key, batch_submit


@pytest.fixture
def db(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@BOTH_BROKERS
def test_a_retried_key_answers_the_same_batch_and_another_body_is_refused(redis_url, broker_url, db):
    tenant, headers = new_tenant()
    other, other_headers = new_tenant()
    key = "order-7 batch"
    with tenant_app(redis_url, tenant, other, broker_url=broker_url) as http:
        def post(body: dict, who: dict = headers) -> httpx.Response:
            return http.post("/v1/batches", json=body, headers={**who, "Idempotency-Key": key})

        first, again = post({"texts": TEXTS, "max_new_tokens": 8}), post({"texts": TEXTS, "max_new_tokens": 8})
        assert first.status_code == again.status_code == 202, first.text
        assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
        assert len(tenant_records(db, tenant)) == 3 and tenant_batches(db, tenant) == [first.json()["batch_id"]]

        refused = post({"texts": TEXTS, "max_new_tokens": 9})  # the same key, another body
        assert refused.status_code == 422, refused.text
        (problem,) = refused.json()["detail"]
        assert problem["loc"] == ["header", "Idempotency-Key"]
        assert repr(key) in problem["msg"] and first.json()["batch_id"] in problem["msg"]
        assert headers["X-API-Key"] not in refused.text and "max_new_tokens" not in refused.text

        # The same jobs as JSON lines are the same batch; another tenant's key of the same name is its own.
        lines = "".join(f'{{"text": "{text}", "max_new_tokens": 8}}\n' for text in TEXTS)
        as_lines = http.post("/v1/batches", content=lines.encode(),
                             headers={**headers, "Idempotency-Key": key, "Content-Type": "application/x-ndjson"})
        assert as_lines.status_code == 202 and as_lines.json() == first.json()
        theirs = post({"texts": TEXTS, "max_new_tokens": 8}, other_headers)
        assert theirs.status_code == 202 and theirs.json()["batch_id"] != first.json()["batch_id"]

        bad_key = http.post("/v1/batches", json={"texts": TEXTS}, headers={**headers, "Idempotency-Key": " x"})
        assert bad_key.status_code == 422
    assert len(tenant_records(db, tenant)) == 3
    assert 0 < db.ttl(_claims()[2](tenant, key)) <= 86_400


@BOTH_BROKERS
def test_a_hundred_racing_retries_through_a_real_gateway_queue_one_batch(redis_url, broker_url, db, tmp_path_factory,
                                                                        figures):
    tenant, headers = new_tenant()
    env = {"REDIS_URL": redis_url, "API_KEYS": f"{tenant}={headers['X-API-Key']}", **(
        {"BROKER_URL": broker_url} if broker_url else {})}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "batch-idempotency-gateway.log")
    body = {"texts": [f"第{i}条评论：还不错" for i in range(20)]}
    start = threading.Barrier(8)

    def retries(_: int) -> list[httpx.Response]:
        with httpx.Client(base_url=gateway.url, headers={**headers, "Idempotency-Key": "the-one"}, timeout=60) as http:
            start.wait()
            return [http.post("/v1/batches", json=body) for _ in range(13)]

    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [answer for part in pool.map(retries, range(8)) for answer in part][:100]
    finally:
        gateway.stop()
    figures.update({"posts": len(answers), "batch ids": len({a.json().get("batch_id") for a in answers}),
                    "jobs queued": len(tenant_records(db, tenant))})
    assert {answer.status_code for answer in answers} == {202}, [a.text for a in answers if a.status_code != 202][:3]
    assert len({answer.text for answer in answers}) == 1  # the same body, so the same batch id
    assert len(tenant_records(db, tenant)) == 20 and len(tenant_batches(db, tenant)) == 1


def _stale_claim(redis_url: str, broker_url: str | None, tenant: str, key: str, texts: list[str], queued: int) -> str:
    """A gateway that died after claiming ``key`` and queueing ``queued`` of the jobs: its claim, with a
    short lease, and those jobs under their batch-job keys. Returns the batch id it had claimed."""
    BatchClaims, batch_digest, _, batch_submit = _claims()  # noqa: N806 (a class)
    requests = [JobRequest.model_validate({"text": text, "tenant": tenant, "priority": "bulk"}) for text in texts]
    claims = BatchClaims(redis.Redis.from_url(redis_url), ttl_s=600, lease_s=0.5)
    claimed = claims.claim(tenant, key, batch_digest(requests), owner="the-dead-gateway")
    assert claimed.outcome == "new"
    with Client(settings=ApiSettings(redis_url=redis_url, broker_url=broker_url)) as client:
        for index in range(queued):
            client.submit(texts[index], tenant=tenant, priority="bulk",
                          idempotency_key=batch_submit.job_idempotency_key(claimed.batch_id, index))
    return claimed.batch_id


@BOTH_BROKERS
def test_a_gateway_dead_between_claim_and_queueing_is_taken_over_once_its_lease_lapses(redis_url, broker_url, db):
    tenant, headers = new_tenant()
    dead_batch = _stale_claim(redis_url, broker_url, tenant, "k-crash", TEXTS, queued=2)
    with tenant_app(redis_url, tenant, broker_url=broker_url) as http:
        response = http.post("/v1/batches", json={"texts": TEXTS}, headers={**headers, "Idempotency-Key": "k-crash"})
        assert response.status_code == 202, response.text
        assert response.json()["batch_id"] == dead_batch  # the claimed id, not a second batch
        status = http.get(response.json()["location"], headers=headers).json()
    assert (status["jobs"], sum(status["counts"].values())) == (3, 3)
    assert len(tenant_records(db, tenant)) == 3  # the 2 the dead gateway queued, and 1 more
    assert tenant_batches(db, tenant) == [dead_batch]


def test_a_retry_that_waits_past_wait_s_is_told_to_come_back(redis_url, db, monkeypatch):
    tenant, headers = new_tenant()
    BatchClaims, batch_digest, _, batch_submit = _claims()  # noqa: N806 (a class)
    requests = [JobRequest.model_validate({"text": text, "tenant": tenant, "priority": "bulk"}) for text in TEXTS]
    BatchClaims(db, ttl_s=600, lease_s=60).claim(tenant, "k-busy", batch_digest(requests), owner="a-slow-gateway")
    monkeypatch.setattr(batch_submit, "WAIT_S", 0.3)
    with tenant_app(redis_url, tenant) as http:
        response = http.post("/v1/batches", json={"texts": TEXTS}, headers={**headers, "Idempotency-Key": "k-busy"})
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "batch_in_progress" and response.headers["retry-after"] == "1"
    assert tenant_records(db, tenant) == []


def test_a_refused_batch_frees_its_key_for_a_new_batch(lonely_redis):
    # On a Redis no worker serves (tests/api/conftest.py), so the tenant's share stays as filled here.
    db, (tenant, headers) = redis.Redis.from_url(lonely_redis.url), new_tenant()
    with tenant_app(lonely_redis.url, tenant, tenant_max_queue=3) as http:
        blocker = http.post("/v1/jobs", json={"text": "先来的"}, headers=headers).json()["job_id"]
        keyed = {**headers, "Idempotency-Key": "k-full"}
        refused = http.post("/v1/batches", json={"texts": TEXTS}, headers=keyed)
        assert refused.status_code == 503 and refused.json()["code"] == "tenant_queue_full", refused.text
        assert db.exists(_claims()[2](tenant, "k-full")) == 0  # the claim was released
        assert http.delete(f"/v1/jobs/{blocker}", headers=headers).status_code == 202
        retried = http.post("/v1/batches", json={"texts": TEXTS}, headers=keyed)
        assert retried.status_code == 202, retried.text
        assert http.post("/v1/batches", json={"texts": TEXTS}, headers=keyed).json() == retried.json()
        status = http.get(retried.json()["location"], headers=headers).json()
    assert status["counts"] == {"queued": 3}  # new jobs, not the refused batch's cancelled ones
    assert {r.status for r in tenant_records(db, tenant)} == {JobStatus.QUEUED, JobStatus.CANCELLED}
