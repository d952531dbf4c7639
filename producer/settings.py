"""The HTTP gateway's settings, read from environment variables: the queue's (``QueueSettings``) plus its own."""

from __future__ import annotations

import base64
import re

from pydantic import Field, SecretStr, field_validator, model_validator

from jobqueue.callback_hosts import AllowedHosts
from jobqueue.protocol import DEFAULT_CALLBACK_MAX_PENDING, TENANT_PATTERN
from jobqueue.settings import QueueSettings

#: The shortest key accepted, for API_KEY and each key of API_KEYS: a key is all that stands between
#: the network and the queue (and a tenant's records), so a short one is refused at start.
MIN_KEY_CHARS = 16


class ApiSettings(QueueSettings):
    """Settings of the HTTP gateway (``producer.api``): the producer's, plus these."""

    #: When set, every /v1 request must carry it in the ``X-API-Key`` header, or it gets 401.
    #: Empty means no key is needed.
    api_key: SecretStr | None = None
    #: Several tenants, each with its own key: ``name=key,name2=key2``. A request's key names
    #: its tenant; conversations and job records are the tenant's own. Replaces API_KEY.
    #: An entry may end with the tenant's own callback hosts, after spaces:
    #: ``acme=key hooks.acme.com hooks.acme.com:8443``; they replace CALLBACK_ALLOWED_HOSTS for its jobs.
    api_keys: SecretStr | None = None
    #: An events stream (SSE) closes with a ``timeout`` event after this long; the job goes on.
    events_timeout_s: float = Field(900.0, gt=0)
    #: Request bodies over this many bytes get 413 before they are read whole.
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    #: ``POST /v1/batches`` takes at most this many texts, in a body of at most MAX_BATCH_BODY_BYTES
    #: (every other route keeps MAX_BODY_BYTES).
    max_batch_items: int = Field(1000, ge=1)
    max_batch_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    #: At most this many event streams (SSE) are open at once; past it a new one gets 503.
    max_event_streams: int = Field(1000, ge=1)
    #: At most this many of them are one tenant's (API_KEYS; 0: only MAX_EVENT_STREAMS); past it 429.
    max_event_streams_per_tenant: int = Field(0, ge=0)
    #: Submits a second each tenant may make on average (0: no limit), and at most this many at once;
    #: past it 429 ``rate_limited`` (a token bucket in Redis, shared by every gateway).
    tenant_submit_rate: float = Field(0.0, ge=0)
    tenant_submit_burst: int = Field(20, ge=1)
    #: The key that signs each callback (Standard Webhooks: ``whsec_`` and the base64 of 24 to 64
    #: random bytes; headers webhook-id, webhook-timestamp, webhook-signature).
    callback_secret: SecretStr | None = None
    #: A callback that keeps failing is retried, with exponential backoff, for this long.
    callback_retry_for_s: float = Field(600.0, gt=0)
    #: One attempt, from resolving the host to the answer's end, is abandoned after this long.
    callback_timeout_s: float = Field(10.0, gt=0, le=300)
    #: At most this many callbacks are sent at once by one gateway, half of them to one host.
    callback_max_concurrent: int = Field(32, ge=2, le=1000)
    #: At most this many callbacks wait to be sent for one host, and for one tenant; past it a
    #: final record queues none (a log line says so).
    callback_max_pending_per_host: int = Field(DEFAULT_CALLBACK_MAX_PENDING, ge=1)
    callback_max_pending_per_tenant: int = Field(DEFAULT_CALLBACK_MAX_PENDING, ge=1)

    @model_validator(mode="after")
    def _callbacks_are_signed(self) -> ApiSettings:
        if self.allowed_callback_hosts and self.callback_secret is None:
            raise ValueError("CALLBACK_ALLOWED_HOSTS needs CALLBACK_SECRET: every callback is signed")
        return self

    @field_validator("callback_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            encoded = value.get_secret_value()
            try:
                key = base64.b64decode(encoded.removeprefix("whsec_"), validate=True)
            except ValueError:
                key = b""
            if not encoded.startswith("whsec_") or not 24 <= len(key) <= 64:
                raise ValueError("must be whsec_ and the base64 of 24 to 64 random bytes (Standard Webhooks)")
        return value

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_KEY_CHARS} characters")
        return value

    @field_validator("api_keys")
    @classmethod
    def _tenant_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _tenant_entries(value)  # raises ValueError naming the entry, never a key
        return value

    @model_validator(mode="after")
    def _one_kind_of_key(self) -> ApiSettings:
        if self.api_key is not None and self.api_keys is not None:
            raise ValueError("set API_KEY (one tenant) or API_KEYS (several), not both")
        return self

    @field_validator("api_key", "api_keys", "callback_secret", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        # docker-compose passes an unset variable as "": that means "no key", never "the empty key".
        return None if value == "" else value


def _tenant_entries(api_keys: SecretStr) -> list[tuple[str, str, AllowedHosts]]:
    """API_KEYS as (tenant, key, callback hosts). Raises ValueError naming the entry's position, never a key.

    Also a settings validator: hide_input_in_errors keeps the value out of pydantic's error."""
    entries: list[tuple[str, str, AllowedHosts]] = []
    for position, entry in enumerate(api_keys.get_secret_value().split(","), 1):
        first, _, hosts = entry.strip().partition(" ")
        tenant, _, key = first.partition("=")
        if not re.fullmatch(TENANT_PATTERN, tenant) or not key:
            raise ValueError(f"entry {position} must be tenant=key, the tenant matching {TENANT_PATTERN}")
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"entry {position}'s key must be at least {MIN_KEY_CHARS} characters")
        if any(key == known or tenant == name for name, known, _ in entries):
            raise ValueError(f"entry {position} repeats a tenant or a key")
        try:
            entries.append((tenant, key, AllowedHosts.parse(hosts, separator=None)))
        except ValueError as err:
            raise ValueError(f"entry {position}'s callback hosts: {err}") from None
    return entries


def tenant_keys(api_keys: SecretStr) -> dict[str, str]:
    """API_KEYS as {key: tenant}."""
    return {key: tenant for tenant, key, _ in _tenant_entries(api_keys)}


def tenant_callback_hosts(settings: ApiSettings) -> dict[str, AllowedHosts]:
    """The tenants (API_KEYS) with callback hosts of their own, and those hosts."""
    if settings.api_keys is None:
        return {}
    hosts = {tenant: allowed for tenant, _, allowed in _tenant_entries(settings.api_keys) if allowed}
    if hosts and settings.callback_secret is None:
        raise ValueError("callback hosts in API_KEYS need CALLBACK_SECRET: every callback is signed")
    return hosts
