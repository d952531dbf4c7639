"""Settings shared by producers and workers: where the records and the queue live, and the queue's limits.

Every setting has a documented default here and one row in docs/settings.md's
settings table. Nothing is read at import time: build ``QueueSettings()``
where it is needed (a ``Client``, the CLI, the worker's app factory). The gateway's own
settings are ``producer.settings.ApiSettings``, the worker's ``worker.settings.WorkerSettings``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobqueue.callback_hosts import AllowedHosts
from jobqueue.protocol import MAX_TIMEOUT_S, TENANT_PATTERN

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: What BROKER_URL may name: a Redis, or an AMQP broker (RabbitMQ).
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


class QueueSettings(BaseSettings):
    # hide_input_in_errors: a ValidationError's text never carries a value (a password in a URL, a key).
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", hide_input_in_errors=True)

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
    #: Submissions of one tenant (API_KEYS; jobs without a tenant count as one) are refused with
    #: TenantQueueFull once this many of its jobs wait (0: only MAX_QUEUE limits them). Redis only.
    tenant_max_queue: int = Field(0, ge=0)
    #: Longest accepted input text, in characters.
    max_input_chars: int = Field(2000, ge=1)
    #: Job records and conversation histories expire this long after their last write.
    result_ttl_s: int = Field(86_400, ge=1)
    #: Time a job may run once started; generation stops here and the reply is marked truncated.
    #: Producers ask for it per job; a worker caps it at its own value.
    job_timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S)
    #: Time a job may wait in the queue before it is recorded ``expired`` without running.
    queue_timeout_s: float = Field(600.0, gt=0)
    #: Hosts a job's callback_url may name, comma-separated (``hooks.example.com,127.0.0.1:9000``);
    #: empty: callbacks are refused. An entry without a port allows 80 and 443 only. A list, not a
    #: pattern; a name that resolves to an internal address is refused when the callback is sent,
    #: unless that address is itself an entry (``jobqueue.callback_hosts``).
    callback_allowed_hosts: str = ""

    @field_validator("callback_allowed_hosts")
    @classmethod
    def _host_entries(cls, value: str) -> str:
        AllowedHosts.parse(value)  # raises ValueError naming the bad entry
        return value

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
    def _lane_limit_needs_redis(self) -> QueueSettings:
        if self.max_queue_bulk and self.broker_kind == "amqp":
            raise ValueError("MAX_QUEUE_BULK needs the queue in Redis: RabbitMQ counts one queue, not its lanes "
                             "(unset it, or BROKER_URL)")
        if self.tenant_max_queue and self.broker_kind == "amqp":
            raise ValueError("TENANT_MAX_QUEUE needs the queue in Redis: its tenants' counts live in the Redis "
                             "queue's line index (unset it, or BROKER_URL)")
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
    def allowed_callback_hosts(self) -> AllowedHosts:
        return AllowedHosts.parse(self.callback_allowed_hosts)


#: Settings whose values may hold a secret (a password in a URL, an API key): never printed.
SECRET_SETTINGS = frozenset({"redis_url", "broker_url", "api_key", "api_keys", "callback_secret"})


def settings_problems(err: ValidationError) -> str:
    """One line for invalid settings: each bad variable and what it accepts. A value is shown only
    where it cannot hold a secret: never a URL or a key, and never the input of a check across
    settings (that input is the whole environment)."""
    problems = []
    for error in err.errors(include_url=False):
        location = [str(part) for part in error["loc"]]
        name = ".".join(location).upper() or "settings"
        value = error.get("input")
        shown = (len(location) == 1 and location[0] not in SECRET_SETTINGS
                 and isinstance(value, (str, int, float)) and not isinstance(value, bool))
        problems.append(f"{name}={value!r}: {error['msg']}" if shown else f"{name}: {error['msg']}")
    return "; ".join(problems)
