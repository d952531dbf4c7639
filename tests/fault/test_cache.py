"""The result cache on a real worker: the same text again is answered without a model pass."""

from __future__ import annotations

import pytest

from producer import JobStatus
from jobqueue.protocol import METRICS_CACHE_KEY
from tests.conftest import start_worker

pytestmark = pytest.mark.slow


def test_the_same_greedy_job_again_is_served_from_the_cache(worker_env, tmp_path, make_client, redis_client,
                                                             figures):
    redis_client.delete(METRICS_CACHE_KEY)
    worker = start_worker("worker.app", tmp_path / "cache.log", {**worker_env, "CACHE_TTL_S": "600"}, name="cache")
    client = make_client()
    text = f"缓存测试 {tmp_path.name} 很好吃"  # a text no other test sends
    try:
        first = client.wait(client.submit(text, max_new_tokens=6, temperature=0.0), timeout=60)
        again = client.wait(client.submit(text, max_new_tokens=6, temperature=0.0), timeout=60)
        sampled = client.wait(client.submit(text, max_new_tokens=6, temperature=0.9), timeout=60)
    finally:
        worker.stop()
    lookups = {k.decode(): int(v) for k, v in redis_client.hgetall(METRICS_CACHE_KEY).items()}
    figures.update(**lookups)
    assert {r.status for r in (first, again, sampled)} == {JobStatus.SUCCEEDED}
    assert not first.sentiment.cached and not first.reply_cached
    assert again.sentiment.cached and again.reply_cached and again.tokens.sentiment_prompt_tokens is None
    assert (again.sentiment.label, again.reply) == (first.sentiment.label, first.reply)
    assert sampled.sentiment.cached and not sampled.reply_cached  # a sampled reply is never cached
    assert lookups == {"sentiment_hits": 2, "sentiment_misses": 1, "reply_hits": 1, "reply_misses": 1}
