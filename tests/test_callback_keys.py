"""Each tenant's callbacks are signed with a key of its own (producer/api/callbacks/keys.py).

Issue 31: with one CALLBACK_SECRET for every tenant, tenant B's receiver accepted a callback of
tenant A's job as validly signed, since every receiver held the one key."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from producer.api.callbacks import signed_headers
from producer.api.callbacks.keys import tenant_secret

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def _signed_for(tenant: str | None, body: bytes) -> dict[str, str]:
    import time

    return signed_headers(Webhook(tenant_secret(SECRET, tenant)), "job-1", body, time.time())


def test_a_tenant_s_receiver_refuses_another_tenant_s_callback():
    body = b'{"job_id": "job-1"}'
    headers = _signed_for("acme", body)
    assert Webhook(tenant_secret(SECRET, "acme")).verify(body, headers)
    for wrong in (tenant_secret(SECRET, "globex"), SECRET):
        with pytest.raises(WebhookVerificationError):
            Webhook(wrong).verify(body, headers)


def test_keys_are_standard_webhooks_secrets_stable_and_distinct():
    keys = {tenant: tenant_secret(SECRET, tenant) for tenant in ("acme", "globex", "acme2")}
    assert all(k.startswith("whsec_") and len(base64.b64decode(k[6:])) == 32 for k in keys.values())
    assert len(set(keys.values())) == 3 and tenant_secret(SECRET, "acme") == keys["acme"]
    assert tenant_secret(SECRET, None) == SECRET  # a job without a tenant: the operator's own key


def test_the_operator_prints_a_tenant_s_key():
    result = subprocess.run([sys.executable, "-m", "producer.api.callbacks.keys", "acme"], capture_output=True,
                            text=True, env={**os.environ, "CALLBACK_SECRET": SECRET}, timeout=60)
    assert result.returncode == 0 and result.stdout == f"acme\t{tenant_secret(SECRET, 'acme')}\n"
