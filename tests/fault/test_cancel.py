"""Cancel on a real worker: a queued job never runs, a running one leaves its batch, a final one stays."""

from __future__ import annotations

import re

import pytest

from producer import AlreadyFinal, JobStatus
from tests.conftest import BOTH_BROKERS, start_worker
from tests.fault.test_batches import FAULT_APP, _submit_behind_a_busy_worker
from tests.test_worker_faults import wait_for

pytestmark = [pytest.mark.slow, BOTH_BROKERS]


def test_cancel_while_queued_while_running_mid_batch_and_after_the_end(worker_env, tmp_path, make_client, figures,
                                                                       broker):
    # Static batches: the three jobs queued behind the busy worker start together as one batch.
    env = {**worker_env, "BATCH_MAX": "4", "PARTIAL_REPLY_INTERVAL_MS": "100", "JOIN_WINDOW_S": "0"}
    worker = start_worker(FAULT_APP, tmp_path / "cancel.log", env, name="cancel")
    client = make_client()
    try:
        long = {"max_new_tokens": 60, "min_new_tokens": 60}
        _, batch = _submit_behind_a_busy_worker(client, [f"[[slow=0.05]] 第{i}单 还行" for i in range(3)], **long)
        queued = client.submit("排在最后", max_new_tokens=4)
        cancelled_queued = client.cancel(queued)  # the batch of three is not even formed yet

        victim = batch[1]
        # Its sentiment is written: it is in the decoding steps (60 of them, 0.05 s each).
        wait_for(lambda: (r := client.get(victim)).status is JobStatus.RUNNING and r.sentiment, timeout=60)
        assert client.cancel(victim).status is JobStatus.RUNNING  # it stops at its next step
        records = [client.wait(job_id, timeout=120) for job_id in batch]
        with pytest.raises(AlreadyFinal) as after_the_end:
            client.cancel(batch[0])
        never_ran = client.get(queued)
        worker_log = worker.log()
    finally:
        worker.stop()
    figures.update(queued_cancelled=never_ran.status.value, mid_batch=[r.status.value for r in records],
                   partial_tokens=records[1].tokens.generated_tokens)
    assert cancelled_queued.status is JobStatus.CANCELLED
    assert never_ran.status is JobStatus.CANCELLED and never_ran.started_at is None and never_ran.attempts == 0
    if broker == "redis":
        assert f"job={queued}" not in worker_log  # its message left the queue with the cancel: never delivered
    else:  # RabbitMQ's queue cannot be edited: the message is delivered, and skipped
        assert re.findall(rf"job={queued} [^\n]*", worker_log) == [f"job={queued} already cancelled, skipping "
                                                                   "redelivered message"]
    assert [r.status for r in records] == [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.SUCCEEDED]
    cancelled = records[1]
    assert cancelled.reply is not None and cancelled.tokens.generated_tokens < 60  # its partial reply, kept
    assert cancelled.error.code.value == "cancelled" and cancelled.sentiment is not None
    assert all(r.batch_size == 3 for r in records)
    assert after_the_end.value.record.status is JobStatus.SUCCEEDED
