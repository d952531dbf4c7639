"""Settings shared by producers and workers, read from environment variables.

Every setting has a documented default here and one row in the README's
settings table. Nothing is read at import time: build ``ProducerSettings()``
where it is needed (a ``Client``, the CLI, the worker's app factory).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.protocol import MAX_TIMEOUT_S, TENANT_PATTERN

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: What BROKER_URL may name: a Redis, or an AMQP broker (RabbitMQ).
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


class ProducerSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    #: Redis holding the job records, conversations and metrics (and the queue, by default).
    redis_url: str = DEFAULT_REDIS_URL
    #: Where the queue lives: a ``redis://`` URL, or ``amqp://user:pw@host:5672/vhost`` for RabbitMQ.
    #: Unset: the queue is in REDIS_URL's Redis. Records stay in Redis either way.
    broker_url: str | None = None
    #: On RabbitMQ, declare the queue as a quorum queue (replicated across a cluster's nodes).
    #: RabbitMQ 3.x quorum queues have no priorities: bulk jobs then queue in arrival order.
    broker_quorum: bool = False
    #: Submissions are refused with QueueFull once this many jobs wait (both lanes together).
    max_queue: int = Field(1000, ge=1)
    #: Bulk submissions are refused once this many bulk jobs wait (0: only MAX_QUEUE limits them).
    max_queue_bulk: int = Field(0, ge=0)
    #: Longest accepted input text, in characters.
    max_input_chars: int = Field(2000, ge=1)
    #: Job records and conversation histories expire this long after their last write.
    result_ttl_s: int = Field(86_400, ge=1)
    #: Time a job may run once started; generation stops here and the reply is marked truncated.
    #: Producers ask for it per job; a worker caps it at its own value.
    job_timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S)
    #: Time a job may wait in the queue before it is recorded ``expired`` without running.
    queue_timeout_s: float = Field(600.0, gt=0)
    #: Hosts a job's callback_url may name, comma-separated (``hooks.example.com,127.0.0.1``);
    #: empty: callbacks are refused. A list, not a pattern, so the service cannot be pointed at
    #: internal addresses.
    callback_allowed_hosts: str = ""

    @field_validator("broker_url", mode="before")
    @classmethod
    def _empty_broker_is_redis(cls, value: object) -> object:
        # docker-compose passes an unset variable as "": that means "the queue is in Redis".
        return None if value == "" else value

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in BROKER_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(s + '://' for s in BROKER_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _lane_limit_needs_redis(self) -> ProducerSettings:
        if self.max_queue_bulk and self.broker_kind == "amqp":
            raise ValueError("MAX_QUEUE_BULK needs the queue in Redis: RabbitMQ counts one queue, not its lanes "
                             "(unset it, or BROKER_URL)")
        return self

    @property
    def broker(self) -> str:
        """The queue's URL: BROKER_URL, or REDIS_URL when it is unset."""
        return self.broker_url or self.redis_url

    @property
    def broker_kind(self) -> str:
        """``redis`` or ``amqp``."""
        return "amqp" if urlsplit(self.broker).scheme in ("amqp", "amqps", "pyamqp") else "redis"

    @property
    def allowed_callback_hosts(self) -> set[str]:
        return {host.strip().lower() for host in self.callback_allowed_hosts.split(",") if host.strip()}


class ApiSettings(ProducerSettings):
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
