"""Failure modes against a real worker subprocess (production app + test fault hooks)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobqueue.protocol import TASK_NAME, ErrorCode, JobStatus, job_key, new_job_id
from tests.conftest import start_worker

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def test_sentiment_is_written_before_the_reply(fault_worker, make_client):
    client = make_client()
    job_id = client.submit("[[slow=0.05]] 送餐太慢了", max_new_tokens=30, temperature=0.0)
    seen = list(client.watch(job_id, timeout=60, poll_interval=0.02))
    statuses = [r.status for r in seen]
    assert statuses[0] is JobStatus.QUEUED and statuses[-1] is JobStatus.SUCCEEDED
    assert JobStatus.RUNNING in statuses
    early = [r for r in seen if r.status is JobStatus.RUNNING and r.sentiment is not None]
    assert early, "no poll saw the sentiment while the reply was still being generated"
    assert all(r.reply is None for r in early)
    assert early[0].sentiment == seen[-1].sentiment


def test_model_failure_fails_the_job_and_the_worker_serves_the_next(fault_worker, make_client):
    client = make_client()
    failed = client.wait(client.submit("[[fail]] 好吃"), timeout=60)
    assert failed.status is JobStatus.FAILED
    assert failed.error.code is ErrorCode.MODEL_ERROR
    assert "injected model failure" in failed.error.message
    ok = client.wait(client.submit("好吃", max_new_tokens=4), timeout=60)
    assert ok.status is JobStatus.SUCCEEDED


def test_deadline_truncates_the_reply_and_the_worker_moves_on(fault_worker, make_client, figures):
    client = make_client(job_timeout_s=1.0)
    record = client.wait(client.submit("[[slow=0.1]] 你好", max_new_tokens=200, temperature=0.0), timeout=60)
    assert record.status is JobStatus.SUCCEEDED
    assert record.truncated is True
    assert record.tokens.generated_tokens < 200
    assert record.finished_at - record.started_at < 2.0
    following = make_client().submit("好吃", max_new_tokens=4)
    nxt = make_client().wait(following, timeout=30)
    assert nxt.status is JobStatus.SUCCEEDED
    gap = nxt.started_at - record.finished_at
    figures.update(jobs=2, truncated=record.truncated, run_s=round(record.finished_at - record.started_at, 2),
                   next_job_started_after_ms=round(1000 * gap))
    assert gap < 1.0


def test_hard_time_limit_records_timed_out_and_the_worker_recovers(fault_worker, make_client, figures):
    client = make_client()
    # One forward pass of 7 s: the deadline cannot stop it; the worker's hard limit
    # (JOB_TIMEOUT_S 5 + TIME_LIMIT_GRACE_S 1, see fault_worker) kills it.
    record = client.wait(client.submit("[[slow=7]] 你好"), timeout=60)
    assert record.status is JobStatus.TIMED_OUT
    assert record.error.code is ErrorCode.TIMED_OUT
    assert record.finished_at is not None
    ok = make_client().wait(make_client().submit("好吃", max_new_tokens=4), timeout=120)
    assert ok.status is JobStatus.SUCCEEDED
    # The killed pool process is replaced and reloads the model before the next job.
    figures.update(jobs=2, final=record.status.value, next_job_started_after_ms=round(
        1000 * (ok.started_at - record.finished_at)))


def test_job_that_waited_past_its_deadline_expires_without_running(fault_worker, make_client, figures):
    busy = make_client().submit("[[slow=0.1]] 忙", max_new_tokens=20, temperature=0.0)
    # Once its sentiment is known its batch is formed: the late job waits for the next one.
    wait_for(lambda: make_client().get(busy).sentiment is not None)
    late = make_client(queue_timeout_s=0.5).submit("好吃")
    record = make_client().wait(late, timeout=60)
    assert record.status is JobStatus.EXPIRED
    assert record.error.code is ErrorCode.EXPIRED
    assert record.started_at is None and record.sentiment is None and record.reply is None
    figures.update(jobs=2, final=record.status.value, ran=record.started_at is not None)
    assert make_client().wait(busy, timeout=60).status is JobStatus.SUCCEEDED


def test_queue_full_on_a_real_broker_writes_nothing(fault_worker, make_client, redis_client):
    busy = make_client().submit("[[slow=0.1]] 忙", max_new_tokens=30, temperature=0.0)
    client = make_client(max_queue=2)
    wait_for(lambda: client.get(busy).sentiment is not None)  # its batch is formed: the next jobs wait
    queued = [client.submit("排队 1"), client.submit("排队 2")]
    keys_before = set(redis_client.keys("qwen-allinone:job:*"))
    from producer import QueueFull

    with pytest.raises(QueueFull, match="MAX_QUEUE=2"):
        client.submit("排队 3")
    assert set(redis_client.keys("qwen-allinone:job:*")) == keys_before
    for job_id in [busy, *queued]:
        assert client.wait(job_id, timeout=60).status is JobStatus.SUCCEEDED


def test_killed_pool_process_job_is_redelivered_and_finishes_once(fault_worker, make_client, figures):
    client = make_client()
    job_id = client.submit("[[slow=0.1]] 你好", max_new_tokens=30, temperature=0.0)
    wait_for(lambda: client.get(job_id).status is JobStatus.RUNNING)
    for pid in fault_worker.pool_child_pids():
        os.kill(pid, signal.SIGKILL)
    record = client.wait(job_id, timeout=120)
    figures.update(jobs=1, pool_kills=1, final=record.status.value, attempts=record.attempts)
    assert record.status is JobStatus.SUCCEEDED
    assert record.attempts == 2


def test_malformed_messages_are_recorded_as_failed(fault_worker, make_client, raw_sender):
    client = make_client()
    bad_args = new_job_id()
    raw_sender.send_task(TASK_NAME, task_id=bad_args, args=[1, 2])
    bad_schema = new_job_id()
    raw_sender.send_task(TASK_NAME, task_id=bad_schema, kwargs={"message": {"request": {"text": ""}}})
    too_long = new_job_id()
    now = time.time()
    raw_sender.send_task(TASK_NAME, task_id=too_long, kwargs={"message": {
        "request": {"text": "x" * 100_000}, "submitted_at": now, "start_by": now + 60, "timeout_s": 5}})
    for job_id, detail in [(bad_args, "unexpected task arguments"), (bad_schema, "request.text"),
                           (too_long, "at most 2000 characters")]:
        # No producer wrote a record for these: the worker creates it.
        record = wait_for(lambda: (r := client.get(job_id)) and r.status.is_final and r, timeout=60)
        assert record.status is JobStatus.FAILED
        assert record.error.code is ErrorCode.INVALID_REQUEST
        assert detail in record.error.message
    assert client.wait(client.submit("好吃", max_new_tokens=4), timeout=60).status is JobStatus.SUCCEEDED


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_never_deserialized(fault_worker, make_client, raw_sender, tmp_path, redis_client):
    marker = tmp_path / "unpickled"
    raw_sender.conf.accept_content = ["json", "pickle"]
    job_id = new_job_id()
    raw_sender.send_task(TASK_NAME, task_id=job_id, kwargs={"message": _Exploit(str(marker))}, serializer="pickle")
    raw_sender.send_task("no.such.task", task_id=new_job_id(), kwargs={})
    client = make_client()
    assert client.wait(client.submit("好吃", max_new_tokens=4), timeout=60).status is JobStatus.SUCCEEDED
    assert not marker.exists()
    assert redis_client.get(job_key(job_id)) is None
    fault_worker.wait_for_log("ContentDisallowed", timeout=10)
    fault_worker.wait_for_log("no.such.task", timeout=10)


def test_redelivered_message_of_a_finished_job_is_not_run_again(fault_worker, make_client, raw_sender):
    client = make_client()
    job_id = client.submit("好吃", max_new_tokens=4)
    first = client.wait(job_id, timeout=60)
    now = time.time()
    raw_sender.send_task(TASK_NAME, task_id=job_id, kwargs={"message": {
        "request": {"text": "好吃"}, "submitted_at": now, "start_by": now + 60, "timeout_s": 5}})
    fault_worker.wait_for_log(f"job={job_id} already succeeded", timeout=30)
    assert client.get(job_id) == first


@pytest.mark.parametrize(("model", "env"), [
    ("/no/such/model", {}),  # found bad in the parent, before the pool starts
    ("Qwen/No-Such-Model", {"HF_HUB_OFFLINE": "1"}),
    ("corrupt", {}),  # a folder whose config.json is broken: fails in the pool process
])
def test_unloadable_model_stops_the_worker_with_one_clear_line(worker_env, tmp_path, model, env):
    if model == "corrupt":
        model = str(tmp_path / "corrupt-model")
        (tmp_path / "corrupt-model").mkdir()
        (tmp_path / "corrupt-model" / "config.json").write_text("{not json")
    worker = start_worker("worker.app", tmp_path / "bad.log", {**worker_env, "MODEL": model, **env},
                          wait_loaded=False, name="bad")
    try:
        assert worker.process.wait(60) != 0
    finally:
        worker.stop()
    log = worker.log()
    # A pool process respawned before the shutdown can print the same line once more.
    assert log.count(f"qwen-allinone worker: cannot start: MODEL={model!r}") >= 1
    assert "Traceback" not in log
