"""Batches in a real worker: waiting jobs run together, fail alone, and survive a killed worker."""

from __future__ import annotations

import re

import pytest

from producer.protocol import ErrorCode, JobStatus
from tests.conftest import start_worker
from tests.test_worker_faults import wait_for

pytestmark = pytest.mark.slow

FAULT_APP = "tests.support.fault_app"


def _submit_behind_a_busy_worker(client, texts: list[str], **options) -> tuple[str, list[str]]:
    """Occupy the worker with one slow job, then queue ``texts`` behind it: they wait together."""
    blocker = client.submit("[[slow=0.05]] 先来的", max_new_tokens=20, temperature=0.0)
    # Its sentiment is known once its batch is formed: what is submitted now waits for the next.
    wait_for(lambda: client.get(blocker).sentiment is not None, timeout=30, interval=0.01)
    return blocker, [client.submit(text, temperature=0.0, **options) for text in texts]


def test_waiting_jobs_run_together_up_to_batch_max(worker_env, tmp_path, make_client, figures):
    worker = start_worker(FAULT_APP, tmp_path / "batch.log", {**worker_env, "BATCH_MAX": "4"}, name="batch")
    client = make_client()
    try:
        blocker, jobs = _submit_behind_a_busy_worker(client, [f"第{i}单 还行" for i in range(6)], max_new_tokens=8)
        records = [client.wait(job_id, timeout=120) for job_id in [blocker, *jobs]]
    finally:
        worker.stop()
    sizes = [r.batch_size for r in records[1:]]
    figures.update(jobs=len(records), batch_sizes=sizes)
    assert all(r.status is JobStatus.SUCCEEDED and r.reply is not None for r in records)
    assert records[0].batch_size == 1
    # Six waited behind the blocker: a batch of four, then the other two.
    assert sorted(sizes) == [2, 2, 4, 4, 4, 4], sizes


def test_a_failing_job_in_a_batch_fails_alone(worker_env, tmp_path, make_client, figures):
    worker = start_worker(FAULT_APP, tmp_path / "fail.log", worker_env, name="batchfail")
    client = make_client()
    try:
        _, jobs = _submit_behind_a_busy_worker(client, ["好吃", "[[fail]] 坏了", "送餐太慢了"], max_new_tokens=8)
        records = [client.wait(job_id, timeout=120) for job_id in jobs]
    finally:
        worker.stop()
    figures.update(jobs=len(jobs), failed=sum(r.status is JobStatus.FAILED for r in records))
    assert [r.status for r in records] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    assert records[1].error.code is ErrorCode.MODEL_ERROR
    # The batch of three failed as a whole, then its jobs ran one by one.
    assert "a batch of 3 jobs failed" in worker.log() and "one by one" in worker.log()
    assert [r.batch_size for r in records] == [1, 1, 1]


def test_a_worker_killed_mid_batch_loses_nothing(worker_env, tmp_path, make_client, figures):
    # Default VISIBILITY_TIMEOUT_S (an hour): liveness brings the dead worker's jobs back.
    env = {**worker_env, "JOB_TIMEOUT_S": "3", "TIME_LIMIT_GRACE_S": "1"}
    worker = start_worker(FAULT_APP, tmp_path / "kill-0.log", env, name="batchkill")
    client = make_client()
    try:
        _, jobs = _submit_behind_a_busy_worker(
            client, [f"[[slow=0.03]] 第{i}单 太慢了" for i in range(5)], max_new_tokens=40)

        def batch_running():
            running = [r for r in map(client.get, jobs) if r.status is JobStatus.RUNNING and r.sentiment]
            return running if len(running) >= 2 and running[0].batch_size >= 2 else None

        in_flight = wait_for(batch_running, timeout=60, interval=0.01)
        worker.kill_all()
        worker = start_worker(FAULT_APP, tmp_path / "kill-1.log", env, name="batchkill")
        records = {job_id: client.wait(job_id, timeout=120) for job_id in jobs}
    finally:
        worker.stop()
    logs = "".join(path.read_text() for path in tmp_path.glob("kill-*.log"))
    final_lines = {job_id: len(re.findall(rf"job={job_id} status=", logs)) for job_id in jobs}
    figures.update(jobs=len(jobs), killed_mid_batch=len(in_flight),
                   lost=sum(r.status is not JobStatus.SUCCEEDED for r in records.values()))
    assert all(r.status is JobStatus.SUCCEEDED for r in records.values()), records
    assert all(records[r.job_id].attempts >= 2 for r in in_flight)
    assert set(final_lines.values()) == {1}, final_lines  # one final record per job


def test_a_batch_killed_by_the_hard_time_limit_times_out_every_job_at_once(worker_env, tmp_path, make_client, figures):
    # JOB_TIMEOUT_S 5 + TIME_LIMIT_GRACE_S 1. A forward pass of 7 s in the batch (its slowest
    # job sets the pace) cannot be stopped by the deadlines. Its own worker, stopped at the end:
    # a worker left running would take the next test's jobs under this hard limit.
    env = {**worker_env, "JOB_TIMEOUT_S": "5", "TIME_LIMIT_GRACE_S": "1"}
    worker = start_worker(FAULT_APP, tmp_path / "hard.log", env, name="hardlimit")
    client = make_client()
    try:
        _, jobs = _submit_behind_a_busy_worker(client, ["[[slow=7]] 很慢", "好吃", "一般"], max_new_tokens=4)
        records = [client.wait(job_id, timeout=60) for job_id in jobs]
    finally:
        worker.stop()
    figures.update(jobs=len(jobs), timed_out=sum(r.status is JobStatus.TIMED_OUT for r in records),
                   batch=records[1].batch_size)
    # All three, promptly: not the delivered job alone, with the rest left running until
    # VISIBILITY_TIMEOUT_S (an hour) brings their messages back.
    assert [r.status for r in records] == [JobStatus.TIMED_OUT] * 3
    assert all(r.error.code is ErrorCode.TIMED_OUT for r in records)
    assert max(r.finished_at for r in records) - min(r.started_at for r in records) < 15


def test_a_job_whose_deadline_passes_in_the_sentiment_pass_fails_alone(worker_env, tmp_path, make_client, figures):
    # The sentiment pass of "[[slow=3]]" takes 3 s, past its 2 s deadline, well inside the
    # hard time limit (2 + 20 s): the job ends at once with its label, and takes no reply row.
    env = {**worker_env, "JOB_TIMEOUT_S": "2", "TIME_LIMIT_GRACE_S": "20"}
    worker = start_worker(FAULT_APP, tmp_path / "deadline.log", env, name="deadline")
    client = make_client()
    try:
        late = client.wait(client.submit("[[slow=3]] 太慢了", max_new_tokens=40), timeout=60)
        after = client.wait(client.submit("好吃", max_new_tokens=8), timeout=60)
    finally:
        worker.stop()
    figures.update(jobs=2, timed_out=1, took_s=round(late.finished_at - late.started_at, 1))
    assert late.status is JobStatus.TIMED_OUT and late.error.code is ErrorCode.TIMED_OUT
    assert "passed before the reply could start" in late.error.message
    assert late.sentiment is not None and late.reply is None
    assert late.finished_at - late.started_at < 10
    assert after.status is JobStatus.SUCCEEDED
