"""Batches: the engine's batched passes, and jobs run together in-process (fakeredis, tiny model)."""

from __future__ import annotations

import time

import pytest

from producer.protocol import LABEL_SETS, ErrorCode, JobStatus, new_job_id
from tests.test_tasks import RecordingStore, message
from worker.admission import RunningJob, admit
from worker.batch import run_jobs
from worker.engine import QwenEngine, ReplyRequest
from worker.model_source import resolve_model_source
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings
from worker.tasks import run, run_batch

TEXTS = ["好吃", "送餐太慢了，等了两个小时，菜都凉了", "Terrible service", "很快，好吃，味道足，量大", "一般般吧"]


@pytest.fixture(scope="module", params=["float32", "int8"])
def engine(request, tiny_model_dir) -> QwenEngine:
    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), request.param, threads=1)


def greedy(text: str, max_new_tokens: int = 12, **limits) -> ReplyRequest:
    return ReplyRequest(text, max_new_tokens=max_new_tokens, deadline=time.time() + 60, temperature=0.0, **limits)


def test_batched_replies_equal_replies_one_at_a_time(engine):
    requests = [greedy(text, max_new_tokens=8 + 2 * i) for i, text in enumerate(TEXTS)]
    alone = [engine.reply_batch([r], history_max_tokens=256)[0] for r in requests]
    together = engine.reply_batch(requests, history_max_tokens=256)
    # Greedy decoding of the same prompts: padding and stacking change nothing.
    assert together == alone
    assert all(r.generated_tokens <= 8 + 2 * i for i, r in enumerate(together))


def test_batched_sentiment_equals_sentiment_one_at_a_time(engine):
    items = [(text, "zh" if i % 2 else "en") for i, text in enumerate(TEXTS)]
    together = engine.classify_batch(items)
    for (text, labels), batched in zip(items, together):
        alone = engine.classify(text, labels)
        assert batched.label == alone.label and batched.prompt_tokens == alone.prompt_tokens
        if engine.dtype_name == "int8":
            # Each text runs alone under int8, so its neighbours cannot move its activation scales.
            assert batched == alone
        for word in LABEL_SETS[labels]:
            assert batched.probabilities[word] == pytest.approx(alone.probabilities[word], abs=1e-3)


def test_each_row_keeps_its_own_limits(engine):
    requests = [
        greedy("送餐太慢了", max_new_tokens=3),
        greedy("很快，好吃", max_new_tokens=20, min_new_tokens=20),
        ReplyRequest("太咸了", max_new_tokens=20, deadline=time.time() - 1),  # out of time before it began
        ReplyRequest("还不错", max_new_tokens=10, deadline=time.time() + 60, temperature=1.5),
    ]
    short, fixed, late, sampled = engine.reply_batch(requests, history_max_tokens=256)
    assert short.generated_tokens <= 3 and not short.truncated
    assert fixed.generated_tokens == 20  # stop tokens ignored until min_new_tokens
    assert late.text == "" and late.generated_tokens == 0 and late.truncated
    assert 1 <= sampled.generated_tokens <= 10


def test_a_row_past_its_deadline_stops_while_the_others_go_on(engine, monkeypatch):
    clock = [time.time()]
    monkeypatch.setattr("worker.engine.generation.time.time", lambda: clock[0])
    monkeypatch.setattr("worker.engine.qwen.time.time", lambda: clock[0])
    steps = []

    def tick(tokens):
        steps.append([len(t) for t in tokens])
        clock[0] += 1.0  # every step takes a "second"

    requests = [greedy("送餐太慢了", max_new_tokens=30, min_new_tokens=30),
                ReplyRequest("很快", max_new_tokens=30, min_new_tokens=30, deadline=clock[0] + 4.5)]
    long, cut = engine.reply_batch(requests, history_max_tokens=256, on_step=tick)
    assert long.generated_tokens == 30 and not long.truncated
    # Steps 1-5 end before the deadline (4.5 "seconds"); the token of step 6 is kept, then it stops.
    assert cut.truncated and cut.generated_tokens == 6
    assert steps[-1] == [30, 6]  # the cut row stopped growing; the other went on


def test_one_unanswerable_label_set_fails_only_its_item(engine):
    engine.unavailable_label_sets["en3"] = "labels='en3' is not available (test)"
    try:
        results = engine.classify_batch([("好吃", "zh"), ("ok", "en3"), ("bad", "en")])
    finally:
        del engine.unavailable_label_sets["en3"]
    assert isinstance(results[1], ValueError) and "en3" in str(results[1])
    assert results[0].label in LABEL_SETS["zh"] and results[2].label in LABEL_SETS["en"]


def test_long_texts_are_split_into_passes_within_the_token_budget(engine, monkeypatch):
    monkeypatch.setattr("worker.engine.qwen.SENTIMENT_BATCH_TOKENS", 64)
    passes = []
    original = engine._last_hidden
    monkeypatch.setattr(engine, "_last_hidden", lambda prefix, rests: passes.append(rests) or original(prefix, rests))
    texts = ["好吃" * 20, "很好", "送餐太慢了" * 6, "一般"]
    results = engine.classify_batch([(t, "zh") for t in texts])
    assert all(len(rests) * max(map(len, rests)) <= 64 or len(rests) == 1 for rests in passes)
    assert sum(len(rests) for rests in passes) == len(texts) and len(passes) > 1
    assert [r.label for r in results] == [engine.classify(t).label for t in texts]


# --- jobs run together (batch.run_jobs) ---


@pytest.fixture
def runtime(tiny_model_dir):
    runtime = WorkerRuntime(WorkerSettings(model=str(tiny_model_dir), max_new_tokens=8, temperature=0.0,
                                           partial_reply_interval_ms=0))
    runtime.engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)
    runtime._store = RecordingStore()
    return runtime


def _admit_all(runtime, texts, **request):
    jobs = [admit(runtime, new_job_id(), message(text, **request), set(), hostname="w1") for text in texts]
    assert all(isinstance(job, RunningJob) for job in jobs)
    return jobs


def _shape(record) -> dict:
    """What a client sees of a record, without the parts that differ from run to run."""
    data = record.model_dump(exclude={"job_id", "submitted_at", "start_by", "started_at", "finished_at",
                                      "timings", "batch_size"})
    data["sentiment"]["confidence"] = round(data["sentiment"]["confidence"], 3)  # batched sums round differently
    return {**data, "timings": {k: v is not None for k, v in record.timings.model_dump().items()}}


def test_jobs_run_together_finish_as_they_would_alone(runtime):
    together = run_jobs(runtime, _admit_all(runtime, TEXTS))
    alone = [run(runtime, new_job_id(), message(text), set(), hostname="w1") for text in TEXTS]
    assert [_shape(r) for r in together] == [_shape(r) for r in alone]
    assert {r.batch_size for r in together} == {len(TEXTS)} and {r.batch_size for r in alone} == {1}
    assert all(r.status is JobStatus.SUCCEEDED and r.reply is not None for r in together)


def test_a_failing_job_fails_alone(runtime, monkeypatch):
    engine = runtime.engine
    classify_batch = engine.classify_batch

    def broken_for_one(items):
        if any("[[fail]]" in text for text, _ in items):
            raise RuntimeError("injected model failure")
        return classify_batch(items)

    monkeypatch.setattr(engine, "classify_batch", broken_for_one)
    records = run_jobs(runtime, _admit_all(runtime, ["好吃", "[[fail]] 坏", "送餐太慢了"]))
    assert [r.status for r in records] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    assert records[1].error.code is ErrorCode.MODEL_ERROR and "injected" in records[1].error.message
    assert records[1].reply is None
    # One final write per job, whatever the retry one by one did.
    finals = [w.job_id for w in runtime.store.writes if w.status.is_final]
    assert sorted(finals) == sorted(r.job_id for r in records)


def test_an_unanswerable_label_set_fails_only_its_job(runtime):
    runtime.engine.unavailable_label_sets["en3"] = "labels='en3' is not available (test)"
    try:
        jobs = _admit_all(runtime, ["好吃"]) + _admit_all(runtime, ["ok"], options={"labels": "en3"})
        records = run_jobs(runtime, jobs)
    finally:
        del runtime.engine.unavailable_label_sets["en3"]
    assert [r.status for r in records] == [JobStatus.SUCCEEDED, JobStatus.FAILED]
    assert "en3" in records[1].error.message


def test_partial_replies_grow_while_the_job_runs(runtime):
    runtime.settings = runtime.settings.model_copy(update={"partial_reply_interval_ms": 0.001})
    [record] = run_jobs(runtime, _admit_all(runtime, ["送餐太慢了"], options={"max_new_tokens": 12, "temperature": 1.0,
                                                                          "min_new_tokens": 12}))
    partial = [w.reply for w in runtime.store.writes if w.status is JobStatus.RUNNING and w.reply]
    assert len(partial) >= 2, partial
    assert all(len(a) <= len(b) for a, b in zip(partial, partial[1:]))
    assert record.status is JobStatus.SUCCEEDED
    assert all(record.reply.startswith(text) for text in partial)


def test_the_kv_cache_formula_matches_a_stacked_batch(engine):
    # README and BENCHMARKS.md state the batch's worst-case memory with this formula.
    from worker.engine.generation import kv_bytes_per_token, stack_caches

    prefix = engine.reply_prefix
    cache, mask = stack_caches([prefix.fork() for _ in range(3)])
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == 3 * len(prefix.ids) * kv_bytes_per_token(engine.model.config)
    assert mask.shape == (3, len(prefix.ids)) and bool(mask.all())


def test_the_delivered_job_runs_even_when_taking_more_fails(runtime):
    class BrokenIntake:
        def take(self, limit, wait_s):
            raise ConnectionError("broker went away")

    runtime.intake = BrokenIntake()
    [record] = run_batch(runtime, new_job_id(), message("好吃"), set(), hostname="w1")
    assert record.status is JobStatus.SUCCEEDED and record.batch_size == 1


def test_redis_going_away_mid_batch_hands_the_jobs_back_instead_of_failing_them(runtime, monkeypatch):
    import redis

    def outage(*args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(runtime.engine, "reply_batch", outage)
    jobs = _admit_all(runtime, ["好吃", "送餐太慢了"])
    with pytest.raises(redis.RedisError):
        run_jobs(runtime, jobs)
    # Not failed for an outage: the task hands the messages back and the jobs run again.
    assert all(not w.status.is_final for w in runtime.store.writes)
