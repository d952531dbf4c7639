"""The job runner in-process: fakeredis for the store, the tiny model for the engine."""

from __future__ import annotations

import time

import fakeredis
import pytest

from jobqueue.protocol import ErrorCode, JobMessage, JobRecord, JobStatus, new_job_id
from jobqueue.store import JobStore
from worker.admission import MAX_ATTEMPTS
from worker.engine.qwen import QwenEngine
from worker.engine.model_source import resolve_model_source
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings
from worker.tasks import run


class RecordingStore(JobStore):
    """A JobStore that remembers every record it wrote, in order."""

    def __init__(self):
        super().__init__(fakeredis.FakeRedis(), ttl_s=60)
        self.writes: list[JobRecord] = []

    def put(self, record, runner=None):
        self.writes.append(record.model_copy(deep=True))
        return super().put(record, runner)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), threads=1)


@pytest.fixture
def runtime(engine, tiny_model_dir):
    runtime = WorkerRuntime(WorkerSettings(model=str(tiny_model_dir), cache_ttl_s=0, max_new_tokens=8))
    runtime.engine = engine
    runtime._store = RecordingStore()
    return runtime


def message(text="好吃", start_in=60.0, **request) -> dict:
    now = time.time()
    submitted = now + min(start_in, 0) - 1  # a job that should have started already was submitted earlier
    return JobMessage(
        request={"text": text, **request}, submitted_at=submitted, start_by=now + start_in, timeout_s=30
    ).model_dump(mode="json")


def test_writes_running_then_sentiment_then_final(runtime):
    record = run(runtime, new_job_id(), message(), set(), hostname="w1")
    writes = runtime.store.writes
    assert [w.status for w in writes] == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    assert writes[0].sentiment is None
    assert writes[1].sentiment is not None and writes[1].reply is None
    assert writes[2].reply is not None and writes[2] == record
    assert record.worker == "w1" and record.attempts == 1


def test_expired_job_is_not_run(runtime):
    record = run(runtime, new_job_id(), message(start_in=-1), set(), hostname="w1")
    assert record.status is JobStatus.EXPIRED and record.error.code is ErrorCode.EXPIRED
    assert record.sentiment is None and record.started_at is None
    assert len(runtime.store.writes) == 1


def test_job_whose_worker_kept_dying_is_failed_not_retried(runtime):
    job_id, raw = new_job_id(), message()
    stuck = JobRecord(job_id=job_id, status=JobStatus.RUNNING, request=raw["request"],
                      submitted_at=raw["submitted_at"], attempts=MAX_ATTEMPTS)
    runtime.store.put(stuck)
    record = run(runtime, job_id, raw, set(), hostname="w1")
    assert record.status is JobStatus.FAILED
    assert record.error.code is ErrorCode.INTERNAL_ERROR
    assert f"died {MAX_ATTEMPTS} times" in record.error.message


def test_finished_job_is_not_run_again(runtime):
    job_id = new_job_id()
    first = run(runtime, job_id, message(), set(), hostname="w1")
    writes = len(runtime.store.writes)
    assert run(runtime, job_id, message(), set(), hostname="w2") == first
    assert len(runtime.store.writes) == writes


@pytest.mark.parametrize(
    ("raw", "unexpected", "detail"),
    [
        (None, set(), "valid dictionary"),
        ({"request": {"text": "hi"}, "submitted_at": "NaN", "start_by": 1, "timeout_s": 1}, set(), "finite number"),
        ({"request": {"text": "hi"}, "submitted_at": 5, "start_by": 1, "timeout_s": 1}, set(), "start_by"),
        ({"request": {"text": "hi"}}, set(), "submitted_at: Field required"),
        ({"request": {"text": "x" * 3000}, "submitted_at": 0, "start_by": 1, "timeout_s": 1}, set(), "at most 2000"),
        ({"request": {"text": "hi"}, "submitted_at": 0, "start_by": 1, "timeout_s": 1}, {"args[0]"}, "unexpected"),
    ],
)
def test_malformed_message_is_recorded_as_failed(runtime, raw, unexpected, detail):
    record = run(runtime, new_job_id(), raw, unexpected, hostname="w1")
    assert record.status is JobStatus.FAILED
    assert record.error.code is ErrorCode.INVALID_REQUEST
    assert detail in record.error.message


def test_engine_exception_fails_only_that_job(runtime, monkeypatch):
    monkeypatch.setattr(runtime.engine, "classify_batch", lambda *a, **k: 1 / 0)
    record = run(runtime, new_job_id(), message(), set(), hostname="w1")
    assert record.status is JobStatus.FAILED and record.error.code is ErrorCode.MODEL_ERROR
    assert "ZeroDivisionError" in record.error.message


def test_conversation_turn_is_stored_and_bounded(runtime):
    runtime.settings = runtime.settings.model_copy(update={"history_max_turns": 2})
    for i in range(3):
        run(runtime, new_job_id(), message(f"第{i}句", conversation_id="c1"), set(), hostname="w1")
    turns = runtime.store.load_turns("c1", 10)
    assert [t.user for t in turns] == ["第1句", "第2句"]


def test_job_whose_worker_died_runs_again_even_past_its_start_deadline(runtime):
    job_id, raw = new_job_id(), message(start_in=-1)
    runtime.store.put(JobRecord(job_id=job_id, status=JobStatus.RUNNING, request=raw["request"],
                                submitted_at=raw["submitted_at"], attempts=1,
                                sentiment={"label": "正面", "confidence": 0.5}))
    record = run(runtime, job_id, raw, set(), hostname="w2")
    assert record.status is JobStatus.SUCCEEDED and record.attempts == 2
    # The first write of the new attempt does not show the dead attempt's sentiment.
    restart = [w for w in runtime.store.writes if w.attempts == 2][0]
    assert restart.status is JobStatus.RUNNING and restart.sentiment is None


def test_final_records_are_never_overwritten(runtime):
    record = run(runtime, new_job_id(), message(), set(), hostname="w1")
    late = record.model_copy(update={"status": JobStatus.TIMED_OUT})
    assert runtime.store.put(late) is False
    assert runtime.store.get(record.job_id).status is JobStatus.SUCCEEDED


def test_unreadable_stored_record_is_replaced(runtime):
    job_id = new_job_id()
    runtime.store.redis.set(f"qwen-allinone:job:{job_id}", b"\xff not json")
    assert run(runtime, job_id, message(), set(), hostname="w1").status is JobStatus.SUCCEEDED


def test_turn_is_stored_once_and_history_off_stores_nothing(runtime):
    from jobqueue.protocol import Turn

    turn = Turn(job_id="j1", user="u", assistant="a")
    runtime.store.append_turn("c2", turn, 4)
    runtime.store.append_turn("c2", turn, 4)  # a retried write or a redelivered job
    assert len(runtime.store.load_turns("c2", 4)) == 1
    assert runtime.store.load_turns("c2", 0) == []
    runtime.store.append_turn("c3", turn, 0)
    assert runtime.store.load_turns("c3", 4) == []


def test_later_turn_waits_for_an_unfinished_earlier_turn(runtime):
    from worker.admission import NotReadyYet

    store = runtime.store
    first_id, second_id = new_job_id(), new_job_id()
    first_raw, second_raw = message("第一句", conversation_id="c9"), message("第二句", conversation_id="c9")
    store.put(JobRecord(job_id=first_id, status=JobStatus.QUEUED, request=first_raw["request"],
                        submitted_at=first_raw["submitted_at"], start_by=first_raw["start_by"]))
    store.push_pending_turn("c9", first_id)
    store.push_pending_turn("c9", second_id)
    writes = len(store.writes)
    with pytest.raises(NotReadyYet, match=first_id):
        run(runtime, second_id, second_raw, set(), hostname="w1")
    assert len(store.writes) == writes  # waiting writes nothing

    run(runtime, first_id, first_raw, set(), hostname="w1")
    assert store.first_pending_turn("c9") == second_id  # a final record releases the next turn
    assert run(runtime, second_id, second_raw, set(), hostname="w1").status is JobStatus.SUCCEEDED
    assert store.first_pending_turn("c9") is None


@pytest.mark.parametrize("earlier", ["missing", "final", "queued past its start deadline"])
def test_dead_earlier_turn_does_not_block_the_conversation(runtime, earlier):
    store = runtime.store
    stale_id, job_id = new_job_id(), new_job_id()
    raw = message("第二句", conversation_id="c10")
    if earlier == "final":
        store.put(JobRecord(job_id=stale_id, status=JobStatus.FAILED, request=raw["request"], submitted_at=0))
    elif earlier == "queued past its start deadline":
        store.put(JobRecord(job_id=stale_id, status=JobStatus.QUEUED, request=raw["request"],
                            submitted_at=0, start_by=1))
    store.push_pending_turn("c10", stale_id)
    store.push_pending_turn("c10", job_id)
    assert run(runtime, job_id, raw, set(), hostname="w1").status is JobStatus.SUCCEEDED


def test_a_job_another_live_process_runs_is_not_run_beside_it(runtime):
    """A copy handed back while its holder was cut off from Redis waits while that holder lives."""
    from jobqueue.protocol import consumer_key, runner_key
    from worker.admission import NotReadyYet

    store = runtime.store
    job_id = new_job_id()
    store.redis.set(runner_key(job_id), "host:1:cutoff")
    store.redis.set(consumer_key("host:1:cutoff"), 1)  # its heartbeat is back
    writes = len(store.writes)
    with pytest.raises(NotReadyYet, match="host:1:cutoff"):
        run(runtime, job_id, message(), set(), hostname="w1")
    assert len(store.writes) == writes

    store.redis.delete(consumer_key("host:1:cutoff"))  # it died: the copy runs
    assert run(runtime, job_id, message(), set(), hostname="w1").status is JobStatus.SUCCEEDED


def _hard_limit_report(runtime, job_id, waiting_pid: int = 0):
    """The parent's report of a hard time limit; ``waiting_pid``: a pool process was waiting for Redis."""
    from billiard.exceptions import TimeLimitExceeded
    from celery import Celery

    from worker.tasks import register

    app = Celery("on-failure-test", set_as_current=False)
    task = register(app, runtime)
    task.redis_outage.waiting.value = waiting_pid
    task.on_failure(TimeLimitExceeded(30), job_id, (), {}, None)
    return task


@pytest.mark.parametrize("waiting_for_redis", [False, True])
def test_a_job_killed_while_it_waited_out_redis_is_not_recorded_timed_out(runtime, waiting_for_redis):
    store = runtime.store
    runtime._parent_store = store
    job_id = new_job_id()
    raw = message()
    store.put(JobRecord(job_id=job_id, status=JobStatus.RUNNING, request=raw["request"],
                        submitted_at=raw["submitted_at"], start_by=raw["start_by"], started_at=time.time()))
    task = _hard_limit_report(runtime, job_id, waiting_pid=4242 if waiting_for_redis else 0)
    expected = JobStatus.RUNNING if waiting_for_redis else JobStatus.TIMED_OUT  # left for the reconciler
    assert store.get(job_id).status is expected
    assert task.redis_outage.waiting_pid() == 0


def test_a_run_whose_claim_passed_to_another_worker_writes_nothing():
    # A worker cut off for longer than LIVENESS_TTL_S: another took the job over (its claim) and
    # runs it. Back on the network, the first may not write over that run, open or final.
    from jobqueue.protocol import runner_key

    store = JobStore(fakeredis.FakeRedis(), 60)
    now = time.time()
    running = JobRecord(job_id=new_job_id(), status=JobStatus.RUNNING, request=None, submitted_at=now,
                        started_at=now)
    assert store.put(running, runner="host-a:1:aaaa")  # no claim yet: the write goes
    store.redis.set(runner_key(running.job_id), "host-b:2:bbbb")  # host b took the run over
    assert store.put(running, runner="host-a:1:aaaa") is False
    final = running.model_copy(deep=True).finish(JobStatus.SUCCEEDED)
    assert store.put(final, runner="host-a:1:aaaa") is False
    assert store.get(running.job_id).status is JobStatus.RUNNING
    assert store.put(final, runner="host-b:2:bbbb")  # the run's own process writes
    # Writers that name no run (the parent's hard-time-limit handler) keep the first-final rule only.
    assert store.put(final.model_copy(update={"status": JobStatus.TIMED_OUT})) is False


def test_a_killed_batch_whose_mark_redis_refuses_goes_back_to_the_queue(monkeypatch):
    # RabbitMQ, the hard time limit hits a batch that waited for a Redis refusing writes: Celery
    # acknowledges the message next, so without a mark (refused too) nothing would ever re-send it.
    import redis

    from worker import tasks

    class Refusing:
        def eval(self, *args):
            raise redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica.")

    sent = []
    monkeypatch.setattr(tasks, "requeue_later", lambda app, kind, job_id, raw, pause: sent.append((kind, job_id, raw)))
    store = JobStore(Refusing(), 60)
    tasks._mark_or_requeue(None, store, "job-1", {"message": {"request": {"text": "好吃"}}})
    assert sent == [("amqp", "job-1", {"request": {"text": "好吃"}})]
