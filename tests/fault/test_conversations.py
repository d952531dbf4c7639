"""Turns of one conversation run in order across workers; other conversations run beside them."""

from __future__ import annotations

import json

import pytest

from jobqueue.protocol import JobStatus, conversation_key
from tests.conftest import BOTH_BROKERS, start_worker

pytestmark = [pytest.mark.slow, BOTH_BROKERS]


def test_turns_run_in_order_and_other_conversations_in_parallel(worker_env, tmp_path, make_client, redis_client,
                                                               figures, broker):
    x, y = f"order-x-{broker}", f"order-y-{broker}"  # one pair per broker's run: both share the Redis
    workers = [start_worker("tests.support.fault_app", tmp_path / f"conv-{i}.log", worker_env, name=f"conv{i}")
               for i in range(2)]
    try:
        client = make_client()
        baseline = client.wait(client.submit("好的，谢谢", max_new_tokens=8, temperature=0.0), timeout=60)
        # Turn 1 is slow (about 1.5 s); turn 2 is submitted right behind it, so the
        # second worker receives it while turn 1 still runs.
        turn1 = client.submit("[[slow=0.05]] 送餐太慢了", conversation_id=x, max_new_tokens=30,
                              temperature=0.0)
        turn2 = client.submit("好的，谢谢", conversation_id=x, max_new_tokens=8, temperature=0.0)
        other = client.submit("[[slow=0.02]] 服务很好", conversation_id=y, max_new_tokens=8,
                              temperature=0.0)
        first, second, parallel = (client.wait(job_id, timeout=120) for job_id in (turn1, turn2, other))
    finally:
        for worker in workers:
            worker.stop()

    assert first.status is second.status is parallel.status is JobStatus.SUCCEEDED
    assert second.started_at >= first.finished_at
    # Same text as the baseline; the extra prompt tokens are turn 1 in the history.
    assert second.tokens.reply_prompt_tokens > baseline.tokens.reply_prompt_tokens
    stored = [json.loads(t) for t in redis_client.lrange(conversation_key(x), 0, -1)]
    assert [t["job_id"] for t in stored] == [turn1, turn2]
    # The other conversation did not wait for conversation x: it ran on the other
    # worker, or beside turn 1 in the same batch.
    assert parallel.started_at < first.finished_at
    assert parallel.worker != first.worker or (parallel.batch_size or 1) > 1
    figures.update(conversations=2, turns=3, turn2_waited_ms=round(1000 * (second.started_at - second.submitted_at)),
                   other_conversation_overlapped=parallel.started_at < first.finished_at)
