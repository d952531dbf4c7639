"""POST /v1/chat/completions with the official `openai` package, against the gateway under uvicorn and a real
worker with the tiny model (and, for keys and a full queue, a gateway whose Redis no worker serves)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import redis

from jobqueue.protocol import QUEUE_NAME, JobRecord, JobStatus, job_key
from producer.client import Client
from jobqueue.settings import QueueSettings
from tests.api.conftest import start_gateway

pytestmark = pytest.mark.slow

KEY = "chat-key-0123456789"
MAX_QUEUE = 1
MESSAGES = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "送餐太慢了，菜都凉了"}]

#: 33 exchanges before the last user message: one turn over MAX_HISTORY_TURNS.
TOO_MANY_TURNS = [{"role": role, "content": "x"} for _ in range(33) for role in ("user", "assistant")] + [
    {"role": "user", "content": "x"}]


@pytest.fixture
def sdk(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_a_completion_has_the_reply_the_sentiment_and_the_served_model(sdk, http):
    answer = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=8, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert answer.model != "gpt-4o-mini" and answer.model  # the served model's name
    sentiment = answer.model_extra["sentiment"]
    assert sentiment["label"] in ("正面", "负面") and 0 <= sentiment["confidence"] <= 1
    assert 0 < answer.usage.completion_tokens <= 8
    # The answer's id names the job; its record holds the turns the request sent.
    record = http.get(f"/v1/jobs/{answer.id.removeprefix('chatcmpl-')}").json()
    assert record["status"] == "succeeded" and record["reply"] == choice.message.content
    assert record["request"]["text"] == "送餐太慢了，菜都凉了"
    assert record["request"]["history"] == [{"user": "你好", "assistant": "你好！有什么可以帮你？"}]
    assert record["request"]["options"]["max_new_tokens"] == 8


def test_a_stream_sends_the_sentiment_first_then_the_reply_then_done(sdk, gateway):
    # A reply of 1024 tokens (about 1.5 s on the tiny model): the worker writes it in parts.
    chunks = list(sdk.chat.completions.create(model="m", messages=MESSAGES[-1:], max_tokens=1024, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"min_tokens": 1024}))
    first, *rest = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.model_extra["sentiment"]["label"] in ("正面", "负面")
    assert all("sentiment" not in (chunk.model_extra or {}) for chunk in rest)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in rest if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in rest if chunk.choices and chunk.choices[0].finish_reason]
    assert text and finishes == ["length"]
    assert rest[-1].choices == [] and rest[-1].usage.completion_tokens > 0
    assert len({chunk.id for chunk in chunks}) == 1
    assert len([chunk for chunk in rest if chunk.choices and chunk.choices[0].delta.content]) > 1
    # On the wire: OpenAI's SSE, ending with [DONE].
    body = {"model": "m", "messages": MESSAGES[-1:], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith(("data: ", ":")) for line in lines)


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, "messages[0].content", "at most 2000 characters"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content", "non-whitespace"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[1].role",
     "the user's"),
    ({"messages": TOO_MANY_TURNS}, "messages", "at most 32 turns (got 33)"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
])
def test_bad_input_is_400_naming_the_field(sdk, fields, param, says):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="m", **fields)
    assert err.value.status_code == 400 and err.value.param == param
    assert says in err.value.message and err.value.type == "invalid_request_error"


def test_a_body_that_is_not_json_is_400_in_openais_shape(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


# --- keys and a full queue: a gateway that no worker serves ---------------------------------------------


@pytest.fixture(scope="module")
def guarded(lonely_redis, tmp_path_factory):
    env = {"REDIS_URL": lonely_redis.url, "MAX_QUEUE": str(MAX_QUEUE), "API_KEY": KEY}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "openai-guarded.log")
    yield gateway
    gateway.stop()


@pytest.fixture
def lonely(guarded, lonely_redis):
    connection = redis.Redis.from_url(lonely_redis.url)
    connection.flushdb()
    yield connection
    connection.close()


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_missing_or_wrong_key_is_401_in_openais_shape(guarded, lonely, key):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = httpx.post(f"{guarded.url}/v1/chat/completions", headers=headers,
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Bearer" in error["message"] and KEY not in error["message"]


def test_the_right_key_as_a_bearer_token_passes(guarded, lonely):
    with openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as err:  # past the key, stopped by the input
            sdk.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])
    assert err.value.param == "messages[0].role"


def test_a_full_queue_is_429_with_retry_after_and_queues_nothing(guarded, lonely, lonely_redis):
    with Client(settings=QueueSettings(redis_url=lonely_redis.url, max_queue=MAX_QUEUE)) as client:
        client.submit("fills the queue")
    with openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as err:
            sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 429 and err.value.code == "queue_full"
    assert err.value.response.headers["retry-after"] == "5"
    assert lonely.llen(QUEUE_NAME) == MAX_QUEUE


def test_a_stream_whose_client_leaves_cancels_its_job(guarded, lonely):
    body = {"model": "m", "messages": [{"role": "user", "content": "nobody reads this"}], "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as response:
        assert response.status_code == 200
        [raw_key] = lonely.keys(job_key("*"))
    deadline = time.monotonic() + 10
    while JobRecord.from_json(lonely.get(raw_key)).status is not JobStatus.CANCELLED:
        assert time.monotonic() < deadline, "the job was not cancelled when its stream's client left"
        time.sleep(0.1)
    assert lonely.llen(QUEUE_NAME) == 0
