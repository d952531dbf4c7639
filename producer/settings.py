"""The HTTP gateway's settings, read from environment variables: the queue's (``QueueSettings``) plus its own."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator

from jobqueue.protocol import TENANT_PATTERN
from jobqueue.settings import QueueSettings


class ApiSettings(QueueSettings):
    """Settings of the HTTP gateway (``producer.api``): the producer's, plus these."""

    #: When set, every /v1 request must carry it in the ``X-API-Key`` header, or it gets 401.
    #: Empty means no key is needed.
    api_key: SecretStr | None = None
    #: Several tenants, each with its own key: ``name=key,name2=key2``. A request's key names
    #: its tenant; conversations and job records are the tenant's own. Replaces API_KEY.
    api_keys: SecretStr | None = None
    #: An events stream (SSE) closes with a ``timeout`` event after this long; the job goes on.
    events_timeout_s: float = Field(900.0, gt=0)
    #: Request bodies over this many bytes get 413 before they are read whole.
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    #: At most this many event streams (SSE) are open at once; past it a new one gets 503.
    max_event_streams: int = Field(1000, ge=1)
    #: The HMAC-SHA256 key that signs each callback's body (header X-Qwen-Allinone-Signature).
    callback_secret: SecretStr | None = None
    #: A callback that keeps failing is retried, with exponential backoff, for this long.
    callback_retry_for_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _callbacks_are_signed(self) -> ApiSettings:
        if self.allowed_callback_hosts and self.callback_secret is None:
            raise ValueError("CALLBACK_ALLOWED_HOSTS needs CALLBACK_SECRET: every callback is signed")
        return self

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


def tenant_keys(api_keys: SecretStr) -> dict[str, str]:
    """API_KEYS as {key: tenant}. Raises ValueError naming the entry's position, never a key.

    Parsed when the gateway starts, not as a settings validator: pydantic's error
    would print the whole value, keys included."""
    keys: dict[str, str] = {}
    for position, entry in enumerate(api_keys.get_secret_value().split(","), 1):
        tenant, _, key = entry.strip().partition("=")
        if not re.fullmatch(TENANT_PATTERN, tenant) or not key:
            raise ValueError(f"entry {position} must be tenant=key, the tenant matching {TENANT_PATTERN}")
        if key in keys or tenant in keys.values():
            raise ValueError(f"entry {position} repeats a tenant or a key")
        keys[key] = tenant
    return keys
