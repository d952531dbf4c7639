"""Every Redis read and write of job records and conversations.

Keys come from ``producer.protocol``; this module is the only place that
touches them. A record is one JSON string written with a single SET, so a
reader sees either the old or the new version, never half of one.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.protocol import (
    QUEUE_NAME,
    JobRecord,
    Turn,
    conversation_key,
    job_key,
)


def connect_redis(url: str, *, retries: int) -> redis.Redis:
    """A Redis client that retries a lost connection ``retries`` times with backoff.

    Producers want few retries (a clear BrokerUnavailable quickly); workers want
    many, so a Redis restart does not fail the job that is running.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s

    # --- job records ---

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(job_key(job_id))
        return None if raw is None else JobRecord.from_json(raw)

    def put(self, record: JobRecord) -> None:
        self.redis.set(job_key(record.job_id), record.to_json(), ex=self.ttl_s)

    def delete(self, job_id: str) -> None:
        self.redis.delete(job_key(job_id))

    # --- queue ---

    def queue_depth(self) -> int:
        """Messages waiting in the Celery queue (not counting jobs already running)."""
        return int(self.redis.llen(QUEUE_NAME))

    # --- conversations ---

    def load_turns(self, conversation_id: str, max_turns: int) -> list[Turn]:
        raw = self.redis.lrange(conversation_key(conversation_id), -max_turns, -1)
        return [Turn.model_validate_json(item) for item in raw]

    def append_turn(self, conversation_id: str, turn: Turn, max_turns: int) -> None:
        key = conversation_key(conversation_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, turn.model_dump_json())
            pipe.ltrim(key, -max_turns, -1)
            pipe.expire(key, self.ttl_s)
            pipe.execute()
