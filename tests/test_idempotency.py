"""Idempotent submits (#30 item 3): one key, one job, on both brokers; another body under the key is
refused naming it; keys are per tenant; the gateway's Idempotency-Key header does the same."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from jobqueue.protocol import OPEN_JOBS_KEY, JobStatus, idempotency_key
from producer import InvalidRequest
from producer.api import create_app
from producer.settings import ApiSettings
from tests.conftest import BOTH_BROKERS

pytestmark = [pytest.mark.slow, BOTH_BROKERS]

THREADS = 8
SUBMITS = 100


def test_a_hundred_racing_submits_of_one_key_queue_one_job(make_client, redis_client, figures):
    key = f"order-{uuid.uuid4()}"
    clients = [make_client() for _ in range(THREADS)]
    before = redis_client.zcard(OPEN_JOBS_KEY)
    start = threading.Barrier(THREADS)

    def submit_all(client) -> list[str]:
        start.wait()
        return [client.submit("同一个请求", tenant="acme", idempotency_key=key) for _ in range(SUBMITS // THREADS + 1)]

    with ThreadPoolExecutor(THREADS) as pool:
        job_ids = [job_id for part in pool.map(submit_all, clients) for job_id in part][:SUBMITS]
    figures.update({"submits": len(job_ids), "job ids": len(set(job_ids)),
                    "jobs opened": redis_client.zcard(OPEN_JOBS_KEY) - before})
    assert len(job_ids) == SUBMITS and len(set(job_ids)) == 1
    assert redis_client.zcard(OPEN_JOBS_KEY) - before == 1  # one job queued, not a hundred
    assert clients[0].get(job_ids[0]).status is JobStatus.QUEUED
    assert redis_client.ttl(idempotency_key("acme", key)) > 0  # kept RESULT_TTL_S, then forgotten


def test_another_request_under_the_key_is_refused_naming_it(make_client):
    client, key = make_client(), f"k-{uuid.uuid4()}"
    first = client.submit("好吃", idempotency_key=key)
    with pytest.raises(InvalidRequest, match=rf"^idempotency_key: '{key}' was used for another request \(job {first}\)") as err:
        client.submit("难吃", idempotency_key=key)
    assert err.value.problems[0][0] == "idempotency_key"
    with pytest.raises(InvalidRequest, match="idempotency_key: must be 1 to 255 printable ASCII"):
        client.submit("好吃", idempotency_key=" spaced ")
    assert client.submit("好吃", idempotency_key=key) == first


def test_keys_are_per_tenant(make_client):
    client, key = make_client(), f"k-{uuid.uuid4()}"
    mine = client.submit("好吃", tenant="a", idempotency_key=key)
    theirs = client.submit("好吃", tenant="b", idempotency_key=key)  # the same key and text
    assert mine != theirs
    assert client.submit("难吃", tenant="c", idempotency_key=key) not in (mine, theirs)


def test_the_gateways_idempotency_key_header(redis_url, broker_url):
    app = create_app(ApiSettings(redis_url=redis_url, broker_url=broker_url, api_keys="a=key-a-0123456789,b=key-b-0123456789"))
    key = f"h-{uuid.uuid4()}"
    with TestClient(app) as http:
        def post(text: str, api_key: str = "key-a-0123456789"):
            return http.post("/v1/jobs", json={"text": text}, headers={"Idempotency-Key": key, "X-API-Key": api_key})

        first, again = post("好吃"), post("好吃")
        assert first.status_code == again.status_code == 202
        assert first.json()["job_id"] == again.json()["job_id"]
        other = post("难吃")
        assert other.status_code == 422
        (problem,) = other.json()["detail"]
        assert problem["loc"] == ["header", "Idempotency-Key"] and key in problem["msg"]
        assert post("好吃", api_key="key-b-0123456789").json()["job_id"] != first.json()["job_id"]  # another tenant
