"""Helpers of the batch tests on the shared Redis (REDIS_URL, db 4 in CI): each test is a tenant of its
own, and counts that tenant's job records, so a worker or another test on the database never skews them."""

from __future__ import annotations

import uuid

import redis
from fastapi.testclient import TestClient

from jobqueue.protocol import JobRecord, batch_record_key, job_key
from producer.api import create_app
from producer.settings import ApiSettings


def new_tenant() -> tuple[str, dict[str, str]]:
    """A tenant name of this test only, and the X-API-Key header of its key."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    return name, {"X-API-Key": f"{name}-key-0123456789"}


def tenant_app(redis_url: str, *tenants: str, **settings) -> TestClient:
    """The gateway in process, with a key per tenant (``<tenant>-key-0123456789``); ``settings`` may
    name a ``broker_url`` (None: the queue in Redis)."""
    keys = ",".join(f"{tenant}={tenant}-key-0123456789" for tenant in tenants)
    return TestClient(create_app(ApiSettings(redis_url=redis_url, api_keys=keys, **settings)))


def tenant_records(client: redis.Redis, tenant: str) -> list[JobRecord]:
    """Every job record of ``tenant`` in the database."""
    records = []
    for key in client.scan_iter(job_key("*"), count=1000):
        raw = client.get(key)
        if raw is not None and f'"tenant":"{tenant}"'.encode() in raw.replace(b" ", b""):
            record = JobRecord.from_json(raw)
            if record.request is not None and record.request.tenant == tenant:
                records.append(record)
    return records


def tenant_batches(client: redis.Redis, tenant: str) -> list[str]:
    """The ids of ``tenant``'s batch records."""
    return [key.decode().rsplit(":", 1)[1] for key in client.scan_iter(batch_record_key("*"), count=1000)
            if client.hget(key, "tenant") == tenant.encode()]
