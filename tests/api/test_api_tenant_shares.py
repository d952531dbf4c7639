"""Fair shares between tenants (#30 item 2), on the real stack: a uvicorn gateway with API_KEYS, Redis,
and a real worker. One tenant floods; the other still gets its share.

- Limits per tenant, each with its own code and Retry-After: TENANT_MAX_QUEUE (503 tenant_queue_full),
  MAX_EVENT_STREAMS_PER_TENANT (429 tenant_streams_full), TENANT_SUBMIT_RATE (429 rate_limited);
  /metrics by tenant name, never a key.
- The fair intake: a tenant's job submitted behind another tenant's 2,000 starts in the first batch.

Both run on a private redis-server that the package's shared worker does not serve (``lonely_redis``),
flushed before each: the queue's contents are what they measure.
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from jobqueue.protocol import JobStatus
from jobqueue.settings import QueueSettings
from producer.client import Client
from tests.api.conftest import start_gateway
from tests.conftest import start_worker

pytestmark = pytest.mark.slow

ACME_KEY, GLOBEX_KEY = "acme-key-0123456789", "globex-key-0123456789"
ACME, GLOBEX = {"X-API-Key": ACME_KEY}, {"X-API-Key": GLOBEX_KEY}
API_KEYS = f"acme={ACME_KEY},globex={GLOBEX_KEY}"
#: The flood behind which the other tenant's job is submitted (the issue's figure).
FLOOD = 2000
BATCH_MAX = 4


@pytest.fixture
def empty_redis(lonely_redis) -> str:
    redis.Redis.from_url(lonely_redis.url).flushdb()
    return lonely_redis.url


def _submit(http: httpx.Client, headers: dict[str, str], text: str = "还行吧") -> httpx.Response:
    return http.post("/v1/jobs", json={"text": text, "max_new_tokens": 1}, headers=headers)


def test_a_flooding_tenant_meets_its_own_limits_and_not_the_others(empty_redis, tmp_path, figures):
    env = {"REDIS_URL": empty_redis, "API_KEYS": API_KEYS, "TENANT_MAX_QUEUE": "6", "TENANT_SUBMIT_RATE": "0.1",
           "TENANT_SUBMIT_BURST": "8", "MAX_EVENT_STREAMS_PER_TENANT": "2", "EVENTS_TIMEOUT_S": "30"}
    gateway = start_gateway(env, tmp_path / "gateway.log")  # no worker: every job stays queued
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            answers = [_submit(http, ACME) for _ in range(9)]
            statuses = [answer.status_code for answer in answers]
            # 6 queued, the 7th and 8th over TENANT_MAX_QUEUE, the 9th over the burst of 8 submits.
            assert statuses == [202] * 6 + [503, 503, 429], [a.text for a in answers]
            full, limited = answers[6], answers[8]
            assert full.json()["code"] == "tenant_queue_full" and int(full.headers["Retry-After"]) > 0
            assert limited.json()["code"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 10
            other = _submit(http, GLOBEX)
            assert other.status_code == 202, other.text  # the other tenant is untouched

            acme_jobs = [answer.json()["job_id"] for answer in answers[:6]]
            with http.stream("GET", f"/v1/jobs/{acme_jobs[0]}/events", headers=ACME) as first, \
                    http.stream("GET", f"/v1/jobs/{acme_jobs[1]}/events", headers=ACME) as second:
                assert first.status_code == second.status_code == 200
                third = http.get(f"/v1/jobs/{acme_jobs[2]}/events", headers=ACME)
                assert third.status_code == 429 and third.json()["code"] == "tenant_streams_full"
                assert int(third.headers["Retry-After"]) > 0
                with http.stream("GET", f"/v1/jobs/{other.json()['job_id']}/events", headers=GLOBEX) as theirs:
                    assert theirs.status_code == 200

            assert http.delete(f"/v1/jobs/{acme_jobs[5]}", headers=ACME).status_code == 202
            metrics = http.get("/metrics").text
            assert 'qwen_allinone_tenant_queue_depth{tenant="acme"} 5.0' in metrics
            assert 'qwen_allinone_tenant_queue_depth{tenant="globex"} 1.0' in metrics
            assert 'qwen_allinone_tenant_jobs_total{status="cancelled",tenant="acme"} 1.0' in metrics
            assert ACME_KEY not in metrics and GLOBEX_KEY not in metrics
    finally:
        gateway.stop()
    figures["#30 tenant limits"] = ({"acme submits": statuses, "globex submit": other.status_code,
                                   "third acme stream": third.status_code})


def test_a_tenants_job_behind_another_tenants_flood_starts_in_the_first_batch(
        empty_redis, tiny_model_dir, tmp_path, figures):
    redis_url = empty_redis
    client = Client(settings=QueueSettings(redis_url=redis_url, max_queue=FLOOD + 10))
    try:
        started = time.monotonic()
        flood = [client.submit(f"第{i}条：还行吧", tenant="acme", max_new_tokens=1) for i in range(FLOOD)]
        filled_s = time.monotonic() - started
        theirs = client.submit("今天的天气真好", tenant="globex", max_new_tokens=1)
        assert client.get(theirs).queue_position == FLOOD + 1  # the lanes' own order: behind the flood

        env = {"REDIS_URL": redis_url, "MODEL": str(tiny_model_dir), "TORCH_THREADS": "1", "CACHE_TTL_S": "0",
               "BATCH_MAX": str(BATCH_MAX)}
        worker = start_worker("worker.app", tmp_path / "worker.log", env, name="fair")
        try:
            deadline = time.monotonic() + 90
            while (record := client.get(theirs)).started_at is None:
                assert time.monotonic() < deadline, "the other tenant's job did not start"
                time.sleep(0.05)
        finally:
            worker.stop()
        records = [r for r in client.get_many(flood) if r is not None and r.started_at is not None]
        ahead = [r for r in records if r.started_at < record.started_at]
    finally:
        client.close()
    # In the worker's first batch: before it, at most that batch's other jobs (Celery's delivery, the
    # oldest of the flood, and joiners taken round robin).
    assert len(ahead) <= BATCH_MAX - 1, len(ahead)
    assert record.status in (JobStatus.RUNNING, JobStatus.SUCCEEDED)
    figures["#30 fair shares"] = ({"flood": FLOOD, "filled in s": round(filled_s, 1), "BATCH_MAX": BATCH_MAX,
                                "flood jobs started before it": len(ahead)})
