"""Batches in a real worker: waiting jobs run together, fail alone, and survive a killed worker."""

from __future__ import annotations

import re

import pytest

from jobqueue.protocol import ErrorCode, JobStatus
from tests.conftest import BOTH_BROKERS, require_llama_cpp, start_worker
from tests.test_worker_faults import wait_for

pytestmark = [pytest.mark.slow, BOTH_BROKERS]

FAULT_APP = "tests.support.fault_app"


def _submit_behind_a_busy_worker(client, texts: list[str], **options) -> tuple[str, list[str]]:
    """Occupy the worker with one slow job, then queue ``texts`` behind it: they wait together."""
    blocker = client.submit("[[slow=0.05]] 先来的", max_new_tokens=20, temperature=0.0)
    # Its sentiment is known once its batch is formed: what is submitted now waits for the next.
    wait_for(lambda: client.get(blocker).sentiment is not None, timeout=30, interval=0.01)
    return blocker, [client.submit(text, temperature=0.0, **options) for text in texts]


def test_waiting_jobs_run_together_up_to_batch_max(worker_env, tmp_path, make_client, figures):
    # Static batches (no join window): the six waiting jobs start in batches of their own.
    env = {**worker_env, "BATCH_MAX": "4", "JOIN_WINDOW_S": "0"}
    worker = start_worker(FAULT_APP, tmp_path / "batch.log", env, name="batch")
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
    # Static batches: the three start together (joiners: see the continuous batching tests).
    worker = start_worker(FAULT_APP, tmp_path / "fail.log", {**worker_env, "JOIN_WINDOW_S": "0"}, name="batchfail")
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


def _kill_mid_batch_and_recover(tmp_path, make_client, env, name, submit, running_enough):
    """Start a worker, ``submit(client)`` -> job ids, kill -9 the whole worker once ``running_enough``
    (client, ids) gives the jobs in flight, start a fresh one: (final records, final log lines, in flight)."""
    worker = start_worker(FAULT_APP, tmp_path / f"{name}-0.log", env, name=name)
    client = make_client()
    try:
        jobs = submit(client)
        in_flight = wait_for(lambda: running_enough(client, jobs, worker), timeout=60, interval=0.01)
        worker.kill_all()
        worker = start_worker(FAULT_APP, tmp_path / f"{name}-1.log", env, name=name)
        records = {job_id: client.wait(job_id, timeout=120) for job_id in jobs}
    finally:
        worker.stop()
    logs = "".join(path.read_text() for path in tmp_path.glob(f"{name}-*.log"))
    final_lines = {job_id: len(re.findall(rf"job={job_id} status=", logs)) for job_id in jobs}
    return records, final_lines, in_flight


def _assert_nothing_lost(records, final_lines, in_flight) -> None:
    assert all(r.status is JobStatus.SUCCEEDED for r in records.values()), [(r.status, r.error) for r in records.values()]
    assert all(records[r.job_id].attempts >= 2 for r in in_flight)
    assert set(final_lines.values()) == {1}, final_lines  # one final record per job


def test_a_worker_killed_mid_batch_loses_nothing(worker_env, tmp_path, make_client, figures):
    # Default VISIBILITY_TIMEOUT_S (an hour): liveness brings the dead worker's jobs back.
    env = {**worker_env, "JOB_TIMEOUT_S": "3", "TIME_LIMIT_GRACE_S": "1"}

    def submit(client):
        return _submit_behind_a_busy_worker(client, [f"[[slow=0.03]] 第{i}单 太慢了" for i in range(5)],
                                            max_new_tokens=40)[1]

    def batch_running(client, jobs, _):
        running = [r for r in map(client.get, jobs) if r.status is JobStatus.RUNNING and r.sentiment]
        return running if len(running) >= 2 and running[0].batch_size >= 2 else None

    records, final_lines, in_flight = _kill_mid_batch_and_recover(tmp_path, make_client, env, "batchkill", submit,
                                                                  batch_running)
    figures.update(jobs=len(records), killed_mid_batch=len(in_flight),
                   lost=sum(r.status is not JobStatus.SUCCEEDED for r in records.values()))
    _assert_nothing_lost(records, final_lines, in_flight)


def test_a_batch_killed_by_the_hard_time_limit_times_out_every_job_at_once(worker_env, tmp_path, make_client, figures):
    # JOB_TIMEOUT_S 5 + TIME_LIMIT_GRACE_S 1 (+ JOIN_WINDOW_S 0). A forward pass of 7 s in the batch (its slowest
    # job sets the pace) cannot be stopped by the deadlines. Its own worker, stopped at the end:
    # a worker left running would take the next test's jobs under this hard limit.
    env = {**worker_env, "JOB_TIMEOUT_S": "5", "TIME_LIMIT_GRACE_S": "1", "JOIN_WINDOW_S": "0"}
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
    env = {**worker_env, "JOB_TIMEOUT_S": "2", "TIME_LIMIT_GRACE_S": "20", "JOIN_WINDOW_S": "0"}
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


# --- continuous batching: jobs join a batch while it decodes, on either engine ---


@pytest.fixture(params=["torch", "llama.cpp"])
def engine_env(request, worker_env, tiny_gguf) -> dict[str, str]:
    """The worker's environment for the tiny model on each engine (llama.cpp runs its GGUF file)."""
    if request.param == "torch":
        return worker_env
    require_llama_cpp()
    return {**worker_env, "MODEL": str(tiny_gguf)}


def _blocker_decoding(client, **options) -> str:
    """A job whose reply decodes slowly (every step sleeps), running once its sentiment is known."""
    blocker = client.submit("[[slow=0.04]] 先来的", max_new_tokens=60, min_new_tokens=60, temperature=0.0, **options)
    wait_for(lambda: client.get(blocker).sentiment is not None, timeout=30, interval=0.01)
    return blocker


@pytest.mark.parametrize("join_window_s", ["30", "0"], ids=["continuous", "static"])
def test_a_job_submitted_while_a_batch_decodes_starts_before_that_batch_ends(
        engine_env, tmp_path, make_client, figures, join_window_s):
    env = {**engine_env, "JOIN_WINDOW_S": join_window_s}
    worker = start_worker(FAULT_APP, tmp_path / "join.log", env, name=f"join{join_window_s}")
    client = make_client()
    try:
        blocker = _blocker_decoding(client)
        joiner = client.submit("好吃", max_new_tokens=8, temperature=0.0)
        first, second = client.wait(blocker, timeout=60), client.wait(joiner, timeout=60)
    finally:
        worker.stop()
    assert first.status is second.status is JobStatus.SUCCEEDED
    assert first.tokens.generated_tokens == 60
    figures.update(mode="continuous" if join_window_s != "0" else "static",
                   joiner_started_before_batch_end=second.started_at < first.finished_at,
                   joiner_batch=second.batch_size)
    if join_window_s == "0":  # static batches: it waits for the whole batch (what the issue saw)
        assert second.started_at >= first.finished_at
        return
    # It joined the running batch: started, and finished, while the first reply still decoded.
    assert second.started_at < first.finished_at and second.finished_at < first.finished_at
    assert second.batch_size == 2 and f"job={blocker} batch: joined by {joiner}" in worker.log()


def test_a_worker_killed_with_rows_that_joined_mid_batch_loses_nothing(engine_env, tmp_path, make_client, figures):
    env = {**engine_env, "JOB_TIMEOUT_S": "5", "TIME_LIMIT_GRACE_S": "1"}

    def submit(client):
        blocker = _blocker_decoding(client)
        return [blocker, *(client.submit(f"[[slow=0.04]] 第{i}单 太慢了", max_new_tokens=40, temperature=0.0)
                           for i in range(3))]

    def joined(client, jobs, worker):
        running = [r for r in map(client.get, jobs[1:]) if r.status is JobStatus.RUNNING and r.sentiment]
        return running if running and "joined by" in worker.log() else None

    records, final_lines, in_flight = _kill_mid_batch_and_recover(tmp_path, make_client, env, "joinkill", submit,
                                                                  joined)
    figures.update(jobs=len(records), joined_when_killed=len(in_flight),
                   lost=sum(r.status is not JobStatus.SUCCEEDED for r in records.values()))
    _assert_nothing_lost(records, final_lines, in_flight)


def test_a_joiner_that_breaks_the_model_fails_alone_and_the_batch_goes_on(engine_env, tmp_path, make_client):
    worker = start_worker(FAULT_APP, tmp_path / "joinfail.log", engine_env, name="joinfail")
    client = make_client()
    try:
        blocker = _blocker_decoding(client)
        joiners = [client.submit(text, max_new_tokens=8, temperature=0.0) for text in ["好吃", "[[fail]] 坏了", "还行"]]
        records = [client.wait(job_id, timeout=60) for job_id in [blocker, *joiners]]
    finally:
        worker.stop()
    assert [r.status for r in records] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED,
                                           JobStatus.SUCCEEDED]
    assert records[2].error.code is ErrorCode.MODEL_ERROR
    # The running reply was not started again for a joiner's fault, and the others joined it.
    assert records[0].attempts == 1 and records[0].tokens.generated_tokens == 60
    assert all(r.started_at < records[0].finished_at for r in (records[1], records[3]))
    assert "one by one" in worker.log()
