"""Conversations belong to their owner: with API_KEYS, one conversation id under two keys is
two conversations, and a tenant cannot read another tenant's jobs (real gateway and worker)."""

from __future__ import annotations

import httpx
import pytest

from jobqueue.protocol import Turn, conversation_key
from tests.api.conftest import start_gateway, wait_final

pytestmark = pytest.mark.slow

ACME = {"X-API-Key": "acme-key-0123456789"}
GLOBEX = {"X-API-Key": "globex-key-0123456789"}


@pytest.fixture(scope="module")
def tenants_gateway(redis_url, api_worker, tmp_path_factory):
    env = {"REDIS_URL": redis_url, "API_KEYS": "acme=acme-key-0123456789,globex=globex-key-0123456789"}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "tenants-gateway.log")
    yield gateway
    gateway.stop()


def _run(http: httpx.Client, text: str, headers: dict[str, str]) -> dict:
    response = http.post("/v1/jobs", json={"text": text, "conversation_id": "user-42", "max_new_tokens": 4},
                         headers=headers)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    with httpx.Client(base_url=str(http.base_url), headers=headers, timeout=30) as tenant_http:
        return wait_final(tenant_http, job_id)


def test_the_same_conversation_id_under_two_keys_is_two_conversations(tenants_gateway, redis_client):
    with httpx.Client(base_url=tenants_gateway.url, timeout=30) as http:
        acme = _run(http, "我叫小明，记住我", ACME)
        globex = _run(http, "我是谁？", GLOBEX)
        # Neither tenant can read the other's job.
        assert http.get(f"/v1/jobs/{acme['job_id']}", headers=GLOBEX).status_code == 404
        assert http.get(f"/v1/jobs/{acme['job_id']}/events", headers=GLOBEX).status_code == 404
        assert http.get(f"/v1/jobs/{acme['job_id']}", headers=ACME).status_code == 200
        assert http.post("/v1/jobs", json={"text": "hi"}, headers={"X-API-Key": "guess"}).status_code == 401

    assert acme["status"] == globex["status"] == "succeeded"
    assert (acme["request"]["tenant"], globex["request"]["tenant"]) == ("acme", "globex")
    turns = {tenant: [Turn.model_validate_json(raw).user
                      for raw in redis_client.lrange(conversation_key(f"{tenant}/user-42"), 0, -1)]
             for tenant in ("acme", "globex")}
    assert turns == {"acme": ["我叫小明，记住我"], "globex": ["我是谁？"]}
    assert redis_client.llen(conversation_key("user-42")) == 0  # nothing in the unscoped conversation
