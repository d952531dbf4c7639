"""OpenAI's chat request read as a job, and the job's own history (JobRequest.history) through the protocol
and the worker: no gateway here (tests/api/test_api_openai.py runs it with the openai package)."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from jobqueue.protocol import (
    MAX_HISTORY_CHARS,
    MAX_HISTORY_TURNS,
    JobMessage,
    JobRecord,
    JobRequest,
    JobStatus,
    Sentiment,
    describe_validation_error,
    new_job_id,
)
from producer.api.openai_chat import (
    ChatCompletionRequest,
    ChatRequestError,
    ChunkWriter,
    chat_job,
    completion,
    request_param,
    validation_param,
)


def chat(*messages: tuple[str, object], **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "anything", "messages": [{"role": role, "content": content} for role, content in messages],
         **fields})


def test_the_last_user_message_is_the_text_and_the_earlier_ones_its_history():
    job = chat(("system", "be brief"), ("user", "你好"), ("assistant", "你好！"), ("user", "菜凉了"),
               ("assistant", "抱歉"), ("user", "送餐太慢了"), max_tokens=64, temperature=0.0, labels="zh3")
    mapped = chat_job(job)
    assert mapped.text == "送餐太慢了" and mapped.text_index == 5
    assert mapped.history == [("你好", "你好！"), ("菜凉了", "抱歉")]  # the system message is not a turn
    assert (mapped.max_new_tokens, mapped.temperature, mapped.labels) == (64, 0.0, "zh3")


def test_a_single_message_has_no_history_and_leaves_the_worker_its_defaults():
    mapped = chat_job(chat(("user", "hi")))
    assert mapped.history is None
    assert (mapped.max_new_tokens, mapped.temperature, mapped.labels) == (None, None, "zh")


def test_runs_of_messages_make_one_turn_and_text_parts_are_joined():
    mapped = chat_job(chat(("assistant", "欢迎"), ("user", "a"), ("user", [{"type": "text", "text": "b"}]),
                           ("assistant", None), ("user", "c"), ("user", "最后")))
    assert mapped.history == [("", "欢迎"), ("a\nb", ""), ("c", "")]
    assert mapped.text == "最后"


def test_max_completion_tokens_wins_and_is_capped_at_the_protocol_limit():
    assert chat_job(chat(("user", "x"), max_tokens=5, max_completion_tokens=7)).max_new_tokens == 7
    assert chat_job(chat(("user", "x"), max_tokens=100_000)).max_new_tokens == 1024


def test_a_conversation_that_does_not_end_with_the_user_is_refused_naming_the_message():
    with pytest.raises(ChatRequestError) as err:
        chat_job(chat(("user", "x"), ("assistant", "y")))
    assert err.value.param == "messages[1].role"


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_fields_are_named_as_openai_names_them(fields, param):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"model": "m", **fields})
    assert validation_param(("body", *err.value.errors()[0]["loc"])) == param


def test_the_jobs_fields_are_named_by_the_requests():
    job = chat_job(chat(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert request_param("text", job) == "messages[2].content"
    assert request_param("history", job) == "messages"
    assert request_param("options.temperature", job) == "temperature"


# --- the protocol: a job's own history ---------------------------------------------------------------


def test_history_is_bounded_in_turns_and_characters_and_never_beside_a_conversation():
    turn = {"user": "u", "assistant": "a"}
    JobRequest(text="x", history=[turn] * MAX_HISTORY_TURNS)
    cases = [
        ({"history": [turn] * (MAX_HISTORY_TURNS + 1)}, f"history: must hold at most {MAX_HISTORY_TURNS} turns"),
        ({"history": [{"user": "u" * MAX_HISTORY_CHARS, "assistant": "a"}]},
         f"history: must hold at most {MAX_HISTORY_CHARS} characters in all (got {MAX_HISTORY_CHARS + 1})"),
        ({"history": [turn], "conversation_id": "c1"}, "history: cannot be sent with conversation_id"),
    ]
    for fields, expected in cases:
        with pytest.raises(ValidationError) as err:
            JobRequest(text="x", **fields)
        assert expected in describe_validation_error(err.value)


def test_history_loses_control_characters_like_the_text():
    request = JobRequest(text="x", history=[{"user": "a\x00b", "assistant": "c\x1bd\n"}])
    assert (request.history[0].user, request.history[0].assistant) == ("ab", "cd\n")


# --- the answer -------------------------------------------------------------------------------------


def record(status: JobStatus, reply: str | None, **fields) -> JobRecord:
    return JobRecord(job_id="j1", status=status, request=None, submitted_at=1000.5, reply=reply,
                     sentiment=Sentiment(label="负面", confidence=0.9), model_id="tiny", **fields)


def test_the_stream_sends_the_sentiment_first_then_what_the_reply_grew_by():
    writer = ChunkWriter("j1", "asked", include_usage=True)
    assert writer.chunks(record(JobStatus.RUNNING, None).model_copy(update={"sentiment": None})) == []
    first = writer.chunks(record(JobStatus.RUNNING, "抱"))
    assert first[0]["sentiment"] == {"label": "负面", "confidence": 0.9}
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"] == {"content": "抱"}
    last = writer.chunks(record(JobStatus.SUCCEEDED, "抱歉。", stop_reason="eos"))
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in last] == [{"content": "歉。"}, {}, None]
    assert last[1]["choices"][0]["finish_reason"] == "stop" and "usage" in last[2]
    assert {c["id"] for c in first + last} == {"chatcmpl-j1"} and {c["model"] for c in last} == {"tiny"}


def test_a_completion_reports_the_served_model_and_the_sentiment():
    answer = completion(record(JobStatus.SUCCEEDED, "抱歉", stop_reason="length"), "gpt-4o")
    assert answer["model"] == "tiny" and answer["sentiment"]["label"] == "负面"
    assert answer["choices"][0]["finish_reason"] == "length" and answer["created"] == 1000


# --- the worker: the job's own history is the reply's --------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from worker.engine.model_source import resolve_model_source
    from worker.engine.qwen import QwenEngine

    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), threads=1)


@pytest.fixture
def runtime(engine, tiny_model_dir):
    import fakeredis

    from jobqueue.store import JobStore
    from worker.runtime import WorkerRuntime
    from worker.settings import WorkerSettings

    runtime = WorkerRuntime(WorkerSettings(model=str(tiny_model_dir), cache_ttl_s=60, max_new_tokens=4,
                                           temperature=0.0, history_max_turns=2))
    runtime.engine = engine
    runtime._store = JobStore(fakeredis.FakeRedis(), ttl_s=60)
    return runtime


def run_job(runtime, **request) -> JobRecord:
    from worker.tasks import run

    now = time.time()
    raw = JobMessage(request=request, submitted_at=now, start_by=now + 60, timeout_s=30).model_dump(mode="json")
    return run(runtime, new_job_id(), raw, set(), hostname="w1")


def test_the_worker_puts_the_jobs_own_turns_in_the_prompt_and_stores_none(runtime, monkeypatch):
    prompts: list[str] = []
    real_prompt = runtime.engine.reply_prompt

    def spy(text, history, mood="neutral"):
        tokens = real_prompt(text, history, mood)
        prompts.append(runtime.engine.text_of(tokens))
        return tokens

    monkeypatch.setattr(runtime.engine, "reply_prompt", spy)
    history = [{"user": "第一句话", "assistant": "第一个回答"}, {"user": "第二句话", "assistant": "第二个回答"},
               {"user": "第三句话", "assistant": "第三个回答"}]
    with_history = run_job(runtime, text="送餐太慢了", history=history)
    without = run_job(runtime, text="送餐太慢了")
    assert with_history.status is JobStatus.SUCCEEDED and without.status is JobStatus.SUCCEEDED
    # HISTORY_MAX_TURNS=2 keeps the latest two turns, as with a stored conversation.
    assert "第一句话" not in prompts[0]
    assert all(text in prompts[0] for text in ("第二句话", "第二个回答", "第三句话", "第三个回答", "送餐太慢了"))
    assert "第二句话" not in prompts[1]
    assert with_history.tokens.reply_prompt_tokens > without.tokens.reply_prompt_tokens
    assert runtime.store.redis.keys("qwen-allinone:conv:*") == []  # a job's own history is never stored


def test_a_greedy_reply_with_history_is_not_cached_and_one_without_is(runtime):
    history = [{"user": "你好", "assistant": "你好！"}]
    for _ in range(2):
        with_history = run_job(runtime, text="好吃", history=history)
        without = run_job(runtime, text="好吃")
    assert not with_history.reply_cached
    assert without.reply_cached
