"""Batches: the engine's batched passes, and jobs run together in-process (fakeredis, tiny model)."""

from __future__ import annotations

import time

import pytest

from jobqueue import cancel
from jobqueue.protocol import ErrorCode, JobStatus, new_job_id
from tests.test_tasks import RecordingStore, message
from worker.admission import RunningJob, admit
from worker.batch import run_jobs
from tests.conftest import require_llama_cpp
from worker.engine import ReplyRequest, StopReason, load_engine
from worker.engine.qwen import QwenEngine
from worker.engine.model_source import resolve_model_source
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings
from worker.tasks import run, run_batch

TEXTS = ["好吃", "送餐太慢了，等了两个小时，菜都凉了", "Terrible service", "很快，好吃，味道足，量大", "一般般吧"]


@pytest.fixture(scope="module", params=["float32", "int8"])
def engine(request, tiny_model_dir) -> QwenEngine:
    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), request.param, threads=1)


def greedy(text: str, max_new_tokens: int = 12, **limits) -> ReplyRequest:
    return ReplyRequest(text, max_new_tokens=max_new_tokens, deadline=time.time() + 60, temperature=0.0, **limits)


def test_a_row_past_its_deadline_stops_while_the_others_go_on(engine, monkeypatch):
    clock = [time.time()]
    monkeypatch.setattr("worker.engine.session.time.time", lambda: clock[0])
    steps = []

    def tick(tokens):
        steps.append([len(t) for t in tokens])
        clock[0] += 1.0  # every step takes a "second"

    requests = [greedy("送餐太慢了", max_new_tokens=30, min_new_tokens=30),
                ReplyRequest("很快", max_new_tokens=30, min_new_tokens=30, deadline=clock[0] + 4.5)]
    long, cut = engine.reply_batch(requests, history_max_tokens=256, on_step=tick)
    assert long.generated_tokens == 30 and long.stop_reason is StopReason.LENGTH
    # Step 1 reads the prompts; tokens 1-4 come before the deadline (4.5 "seconds"), the 5th
    # after it: kept, then the row stops.
    assert cut.truncated and cut.generated_tokens == 5 and cut.stop_reason is StopReason.DEADLINE
    assert steps[-1] == [30, 5]  # the cut row stopped growing; the other went on


def test_long_texts_are_split_into_passes_within_the_token_budget(engine, monkeypatch):
    monkeypatch.setattr("worker.engine.torch_model.PASS_TOKENS", 64)
    decoder = engine.model.decoder
    passes = []
    handle = decoder.register_forward_pre_hook(lambda _, args: passes.append([len(t) for _, t in args[1]]))
    try:
        texts = ["好吃" * 40, "很好", "送餐太慢了" * 6, "一般"]
        results = engine.classify_batch([(t, "zh") for t in texts])
    finally:
        handle.remove()
    assert all(sum(lengths) <= 64 for lengths in passes) and len(passes) > 1
    monkeypatch.setattr("worker.engine.torch_model.PASS_TOKENS", 2048)
    assert [r.label for r in results] == [engine.classify(t).label for t in texts]


# --- jobs run together (batch.run_jobs) ---


@pytest.fixture
def runtime(tiny_model_dir):
    runtime = WorkerRuntime(WorkerSettings(model=str(tiny_model_dir), cache_ttl_s=0, max_new_tokens=8, temperature=0.0,
                                           partial_reply_interval_ms=0))
    runtime.engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)
    runtime._store = RecordingStore()
    return runtime


@pytest.fixture(params=["torch", "llama.cpp"])
def runtime_on(request, runtime, tiny_gguf):
    """``runtime`` on each engine (llama.cpp runs the tiny model's GGUF file in 4 rows of 1,024 tokens)."""
    if request.param == "llama.cpp":
        require_llama_cpp()
        runtime.engine = load_engine(resolve_model_source(str(tiny_gguf)), threads=1, engine="llama.cpp",
                                     max_rows=4, kv_cache_tokens=4096)
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


def test_a_job_cannot_ask_for_more_new_tokens_than_the_worker_allows(runtime):
    [record] = run_jobs(runtime, _admit_all(runtime, ["送餐太慢了"], options={"max_new_tokens": 1024,
                                                                          "min_new_tokens": 1024}))
    assert record.status is JobStatus.SUCCEEDED
    assert record.tokens.generated_tokens == runtime.settings.max_new_tokens == 8


def test_partial_replies_grow_while_the_job_runs(runtime):
    runtime.settings = runtime.settings.model_copy(update={"partial_reply_interval_ms": 0.001, "max_new_tokens": 12})
    [record] = run_jobs(runtime, _admit_all(runtime, ["送餐太慢了"], options={"max_new_tokens": 12, "temperature": 1.0,
                                                                          "min_new_tokens": 12}))
    partial = [w.reply for w in runtime.store.writes if w.status is JobStatus.RUNNING and w.reply]
    assert len(partial) >= 2, partial
    assert all(len(a) <= len(b) for a, b in zip(partial, partial[1:]))
    assert record.status is JobStatus.SUCCEEDED
    # A reply cut by its limit ends at its last sentence boundary, which later partials may have passed.
    assert all(record.reply.startswith(text) or (record.truncated and text.startswith(record.reply))
               for text in partial)


def test_the_kv_cache_formula_matches_a_batch_of_sequences(engine):
    # README and BENCHMARKS.md state the batch's worst-case memory with this formula.
    sequences = engine.model.new_sequences(3, 40)
    held = sum(t.nbytes for t in sequences.cache.keys + sequences.cache.values)
    assert held == 3 * 40 * engine.info().kv_bytes_per_token


def test_the_delivered_job_runs_even_when_taking_more_fails(runtime):
    class BrokenIntake:
        def take(self, limit, wait_s, hand_back=True):
            raise ConnectionError("broker went away")

    runtime.intake = BrokenIntake()
    [record] = run_batch(runtime, new_job_id(), message("好吃"), set(), hostname="w1")
    assert record.status is JobStatus.SUCCEEDED and record.batch_size == 1


def test_redis_going_away_mid_batch_hands_the_jobs_back_instead_of_failing_them(runtime, monkeypatch):
    import redis

    def outage(*args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(runtime.engine, "open_replies", outage)
    jobs = _admit_all(runtime, ["好吃", "送餐太慢了"])
    with pytest.raises(redis.RedisError):
        run_jobs(runtime, jobs)
    # Not failed for an outage: the task hands the messages back and the jobs run again.
    assert all(not w.status.is_final for w in runtime.store.writes)


# --- cancel ---

#: What a stubbed model "writes": one character a generated token.
STORY = "从前有一个小村庄，坏蛋来了以后大家都很害怕，后来勇敢的孩子们赶走了他。"


def test_a_cancelled_row_leaves_the_batch_with_its_partial_reply_and_the_others_go_on(runtime, monkeypatch):
    monkeypatch.setattr(cancel, "POLL_S", 0.0)  # read the flags after every step
    runtime.settings.partial_reply_interval_ms = 0.001  # and write partial replies (text_of) after every step
    eight = {"options": {"max_new_tokens": 8, "min_new_tokens": 8}}
    jobs = _admit_all(runtime, TEXTS[:3], **eight)
    victim = jobs[1].record.job_id
    def text_of(tokens):  # one character a token (the tiny model's greedy tokens decode to nothing)
        if len(tokens) == 3:  # the client cancels once the victim has three tokens
            cancel.request(runtime.store, victim, lanes=[])
        return STORY[: len(tokens)]

    monkeypatch.setattr(runtime.engine, "text_of", text_of)
    cancelled_batch = run_jobs(runtime, jobs)
    alone = [run(runtime, new_job_id(), message(text, **eight), set(), hostname="w1") for text in TEXTS[:3]]
    statuses = [r.status for r in cancelled_batch]
    assert statuses == [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.SUCCEEDED]
    cancelled = cancelled_batch[1]
    assert cancelled.error.code.value == "cancelled" and cancelled.sentiment is not None
    assert 3 <= cancelled.tokens.generated_tokens < 8  # stopped at the next step, not at the end
    assert cancelled.reply and alone[1].reply.startswith(cancelled.reply)  # what it had generated so far
    assert len(cancelled.reply) == cancelled.tokens.generated_tokens
    # The other rows are what they are alone (greedy).
    assert [cancelled_batch[0].reply, cancelled_batch[2].reply] == [alone[0].reply, alone[2].reply]
    assert runtime.store.redis.exists(f"qwen-allinone:cancel:{victim}") == 0  # the flag went with the final record


# --- result cache ---


def test_a_cache_hit_costs_no_model_pass(runtime, monkeypatch):
    runtime.settings.cache_ttl_s = 60
    runtime._cache = None
    passes = {"classify_batch": 0, "open_replies": 0}
    for name in passes:
        real = getattr(runtime.engine, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            passes[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(runtime.engine, name, counted)
    first = run_jobs(runtime, _admit_all(runtime, ["好吃", "太慢了"]))
    assert passes == {"classify_batch": 1, "open_replies": 1}
    again = run_jobs(runtime, _admit_all(runtime, ["好吃", "太慢了"]))
    assert passes == {"classify_batch": 1, "open_replies": 1}  # no model pass at all
    assert all(r.sentiment.cached and r.reply_cached for r in again)
    assert [(r.sentiment.label, r.sentiment.confidence, r.reply) for r in again] == \
        [(r.sentiment.label, r.sentiment.confidence, r.reply) for r in first]
    sampled = run_jobs(runtime, _admit_all(runtime, ["好吃"], options={"temperature": 0.7}))
    assert passes == {"classify_batch": 1, "open_replies": 2}  # a sampled reply is never cached; its sentiment is
    assert sampled[0].sentiment.cached and not sampled[0].reply_cached
    lookups = runtime.store.read_metrics().cache_lookups
    assert lookups == {"sentiment_hits": 3, "sentiment_misses": 2, "reply_hits": 2, "reply_misses": 2}


@pytest.mark.parametrize("scope, b_sees_a_s_entry", [("tenant", False), ("global", True)])
def test_the_cache_answers_a_tenant_only_with_its_own_entries_unless_shared(runtime, scope, b_sees_a_s_entry):
    """Issue 31: tenant B's job was answered from tenant A's entry, so its `cached` flags (and speed)
    told B that A had sent the same text within the hour."""
    runtime.settings.cache_ttl_s = 60
    runtime.settings.cache_scope = scope
    runtime._cache = None
    run_jobs(runtime, _admit_all(runtime, ["好吃"], tenant="a"))
    (b_job,) = run_jobs(runtime, _admit_all(runtime, ["好吃"], tenant="b"))
    assert (b_job.sentiment.cached, b_job.reply_cached) == (b_sees_a_s_entry, b_sees_a_s_entry)
    (b_again,) = run_jobs(runtime, _admit_all(runtime, ["好吃"], tenant="b"))
    assert b_again.sentiment.cached and b_again.reply_cached  # a tenant's own entries still answer it


# --- safety filter ---


def test_a_flagged_term_never_appears_in_a_partial_or_final_reply(runtime, monkeypatch):
    from worker.safety import SafetyFilter

    long = {"options": {"max_new_tokens": 24, "min_new_tokens": 24}}
    monkeypatch.setattr(runtime.engine, "text_of", lambda tokens: STORY[: len(tokens)])
    term = "村庄"  # the model writes it at tokens 7 and 8 (MAX_NEW_TOKENS is 8 here)
    runtime.safety = SafetyFilter([term, "从不出现的词"])
    runtime.settings.partial_reply_interval_ms = 0.001  # a partial reply after every step
    runtime.store.writes.clear()
    [filtered] = run_jobs(runtime, _admit_all(runtime, ["讲个故事"], **long))
    partials = [w.reply for w in runtime.store.writes if w.status is JobStatus.RUNNING and w.reply]
    assert partials, "partial replies were written"
    assert all(term.casefold() not in p.casefold() for p in partials)
    assert filtered.reply == runtime.settings.safety_message
    assert filtered.flagged.reply == [term] and filtered.flagged.input == []


def test_a_text_with_a_flagged_term_gets_no_generated_reply(runtime, monkeypatch):
    from worker.safety import SafetyFilter

    runtime.safety = SafetyFilter(["坏词"])
    monkeypatch.setattr(runtime.engine, "open_replies", lambda *a, **k: pytest.fail("no reply should run"))
    [record] = run_jobs(runtime, _admit_all(runtime, ["这里有个坏词"]))
    assert record.status is JobStatus.SUCCEEDED and record.sentiment is not None
    assert record.reply == runtime.settings.safety_message and record.flagged.input == ["坏词"]
    assert [(s.term, s.start, s.end) for s in record.flagged.input_spans] == [("坏词", 4, 6)]  # 这里有个|坏词|


def test_a_flagged_text_is_not_stored_as_a_conversation_turn(runtime):
    from worker.safety import SafetyFilter

    runtime.safety = SafetyFilter(["坏词"])
    [flagged] = run_jobs(runtime, _admit_all(runtime, ["这里有个坏词"], conversation_id="c-flag"))
    [plain] = run_jobs(runtime, _admit_all(runtime, ["好吃"], conversation_id="c-plain"))
    assert flagged.flagged.input == ["坏词"] and plain.flagged is None
    # The next turn's prompt never carries it; an unflagged turn is stored as before.
    assert runtime.store.load_turns(flagged.request.conversation_scope, 10) == []
    assert [turn.user for turn in runtime.store.load_turns(plain.request.conversation_scope, 10)] == ["好吃"]


def test_a_reply_cut_by_its_limit_never_ends_with_the_start_of_a_flagged_term(runtime, monkeypatch):
    from worker.safety import SafetyFilter

    monkeypatch.setattr(runtime.engine, "text_of", lambda tokens: STORY[: len(tokens)])
    runtime.safety = SafetyFilter(["村庄"])  # STORY's 7th and 8th characters
    cut = {"options": {"max_new_tokens": 7, "min_new_tokens": 7}}
    [record] = run_jobs(runtime, _admit_all(runtime, ["讲个故事"], **cut))
    assert record.truncated and record.flagged is None
    assert record.reply == STORY[:6]  # not STORY[:7], which ends with 村


def test_a_cache_entry_that_does_not_decode_is_a_miss(runtime):
    from jobqueue.protocol import cache_key

    runtime.settings.cache_ttl_s = 60
    runtime._cache = None
    [first] = run_jobs(runtime, _admit_all(runtime, ["好吃"]))
    for key in runtime.store.redis.keys(cache_key("*", "*")):
        runtime.store.redis.set(key, b'{"written by": "another version"}')
    [again] = run_jobs(runtime, _admit_all(runtime, ["好吃"]))
    assert again.status is JobStatus.SUCCEEDED and not again.sentiment.cached and not again.reply_cached
    assert (again.sentiment.label, again.reply) == (first.sentiment.label, first.reply)


class _FakeMessage:
    acked = requeued = False

    def ack(self):
        self.acked = True

    def reject(self, requeue):
        self.requeued = requeue


def test_a_second_copy_of_a_job_the_batch_runs_is_dropped_not_run_beside_it(runtime):
    from worker.joining import admit_taken
    from jobqueue.queue.intake import TakenJob

    job_id, raw = new_job_id(), message("好吃")
    assert isinstance(admit(runtime, job_id, raw, set(), hostname="w1"), RunningJob)
    copy = TakenJob(job_id, raw, set(), _FakeMessage())
    other = TakenJob(new_job_id(), message("还行"), set(), _FakeMessage())
    in_batch = {job_id}
    jobs, finished = admit_taken(runtime, [copy, other], "w1", in_batch)
    # The copy is acknowledged (the batch's own message still guards the job); the other job runs.
    assert [job.record.job_id for job in jobs] == [other.job_id] and finished == []
    assert copy.message.acked and not other.message.acked
    assert in_batch == {job_id, other.job_id}
    assert runtime.store.get(job_id).attempts == 1  # not admitted a second time


def test_a_long_joiner_s_sentiment_is_read_between_the_running_rows_steps(runtime_on, monkeypatch):
    from worker.batch import DecodingRows, _prepare_joiners, _prepare_replies

    import math

    from worker.engine.session import PREFILL_CHUNK_TOKENS

    runtime = runtime_on
    engine, long_text = runtime.engine, "送餐太慢了，等了两个小时，菜都凉了，打电话也没人接。" * 70
    [running] = _admit_all(runtime, ["好吃"], options={"max_new_tokens": 8, "min_new_tokens": 8})
    with engine.open_replies(4, history_max_tokens=0) as session:
        rows = DecodingRows(runtime, engine, session)
        rows.start(_prepare_replies(runtime, engine, [running]))
        steps, real_step = [], rows.step
        monkeypatch.setattr(rows, "step", lambda: steps.append(len(session.tokens(0))) or real_step())
        [joiner] = _admit_all(runtime, [long_text])
        [pending] = _prepare_joiners(runtime, engine, [joiner], rows)
    # Its prompt was read 256 tokens at a time, and the running row took a step between chunks.
    chunks = math.ceil((joiner.record.tokens.sentiment_prompt_tokens - len(engine.classifier_prefixes["zh"].ids))
                       / PREFILL_CHUNK_TOKENS)
    assert chunks >= 3 and len(steps) == chunks - 1
    assert steps == sorted(steps) and steps[-1] > steps[0]  # the running row's reply grew meanwhile
    assert pending.job is joiner and joiner.record.sentiment.label == engine.classify(long_text).label
    assert joiner.record.sentiment.confidence == pytest.approx(engine.classify(long_text).confidence, abs=1e-4)


def test_a_running_row_that_breaks_while_a_joiner_is_read_fails_the_batch_not_the_joiner(runtime_on, monkeypatch):
    from worker.batch import DecodingRows, _prepare_joiners, _prepare_replies, _RunningRowsFailed

    runtime = runtime_on
    engine = runtime.engine
    [running] = _admit_all(runtime, ["好吃"], options={"max_new_tokens": 8, "min_new_tokens": 8})
    with engine.open_replies(4, history_max_tokens=0) as session:
        rows = DecodingRows(runtime, engine, session)
        rows.start(_prepare_replies(runtime, engine, [running]))

        def broken_step():
            raise RuntimeError("the running rows' pass broke")

        monkeypatch.setattr(rows, "step", broken_step)
        [joiner] = _admit_all(runtime, ["送餐太慢了，等了两个小时，菜都凉了，打电话也没人接。" * 40])
        with pytest.raises(_RunningRowsFailed) as raised:
            _prepare_joiners(runtime, engine, [joiner], rows)
    # Not blamed on the joiner: the batch as a whole fails and run_jobs reruns its jobs one by one.
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert not joiner.record.status.is_final


def test_a_joiner_s_sentiment_waits_for_cache_the_running_rows_hold_and_then_is_read(tiny_gguf, runtime):
    """llama.cpp's cache is one fixed pool: a joiner's prompt is read only into cells no running
    reply has reserved, so it waits for rows to leave instead of failing the pass."""
    from worker.batch import DecodingRows, _prepare_joiners, _prepare_replies

    require_llama_cpp()
    runtime.engine = engine = load_engine(resolve_model_source(str(tiny_gguf)), threads=1, engine="llama.cpp",
                                          max_rows=4, kv_cache_tokens=512)
    runtime.settings = runtime.settings.model_copy(update={"max_new_tokens": 300})
    [running] = _admit_all(runtime, ["好吃"], options={"max_new_tokens": 300, "min_new_tokens": 300})
    text = "送餐太慢了，等了两个小时，菜都凉了，打电话也没人接。" * 12  # more cells than the running row leaves free
    with engine.open_replies(4, history_max_tokens=0) as session:
        rows = DecodingRows(runtime, engine, session)
        rows.start(_prepare_replies(runtime, engine, [running]))
        held = session.reserved
        [joiner] = _admit_all(runtime, [text])
        prompt = engine.chat.encode_chat(engine.chat.classifier_messages(text, "zh", engine.prompt_variant))
        need = len(prompt) - len(engine.classifier_prefixes["zh"].ids)
        assert held + need > session.token_limit >= need  # it cannot be read beside the running row
        [pending] = _prepare_joiners(runtime, engine, [joiner], rows)
        assert len(session) == 0  # it was read once the running row had left
    assert running.record.status is JobStatus.SUCCEEDED and running.record.tokens.generated_tokens == 300
    assert joiner.record.tokens.sentiment_prompt_tokens == len(prompt)
    assert joiner.record.sentiment.label == engine.classify(text).label and pending.job is joiner
