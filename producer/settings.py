"""Settings shared by producers and workers, read from environment variables.

Every setting has a documented default here and one row in the README's
settings table. Nothing is read at import time: build ``ProducerSettings()``
where it is needed (a ``Client``, the CLI, the worker's app factory).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.protocol import MAX_TIMEOUT_S

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ProducerSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    #: Redis holding the queue (Celery broker), the job records and conversations.
    redis_url: str = DEFAULT_REDIS_URL
    #: Submissions are refused with QueueFull once this many jobs wait.
    max_queue: int = Field(1000, ge=1)
    #: Longest accepted input text, in characters.
    max_input_chars: int = Field(2000, ge=1)
    #: Job records and conversation histories expire this long after their last write.
    result_ttl_s: int = Field(86_400, ge=1)
    #: Time a job may run once started; generation stops here and the reply is marked truncated.
    #: Producers ask for it per job; a worker caps it at its own value.
    job_timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S)
    #: Time a job may wait in the queue before it is recorded ``expired`` without running.
    queue_timeout_s: float = Field(600.0, gt=0)


class ApiSettings(ProducerSettings):
    """Settings of the HTTP gateway (``producer.api``): the producer's, plus these."""

    #: When set, every /v1 request must carry it in the ``X-API-Key`` header, or it gets 401.
    #: Empty means no key is needed.
    api_key: SecretStr | None = None
    #: An events stream (SSE) closes with a ``timeout`` event after this long; the job goes on.
    events_timeout_s: float = Field(900.0, gt=0)
    #: Request bodies over this many bytes get 413 before they are read whole.
    max_body_bytes: int = Field(64 * 1024, ge=1024)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        # docker-compose passes an unset variable as "": that means "no key", never "the empty key".
        return None if value == "" else value
