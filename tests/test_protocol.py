"""The job protocol: validation, key scheme, record format."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from jobqueue import keys, protocol
from jobqueue.queue import CELERY_WIRE_CONFIG
from jobqueue.protocol import (
    JobMessage,
    JobRecord,
    JobRequest,
    JobStatus,
    Sentiment,
    conversation_key,
    is_job_id,
    job_key,
    new_job_id,
)


def validate(data, limit=2000):
    return JobRequest.model_validate(data, context={"max_input_chars": limit})


def test_key_scheme_is_documented_and_prefixed():
    assert job_key("abc") == "qwen-allinone:job:abc"
    assert conversation_key("c1") == "qwen-allinone:conv:c1"
    assert protocol.QUEUE_NAME == "qwen-allinone"
    assert protocol.OPEN_JOBS_KEY == "qwen-allinone:open"
    for name in ("qwen-allinone:job:<job_id>", "qwen-allinone:conv:<scope>", "qwen-allinone:turns:<scope>",
                 "qwen-allinone:open", "qwen-allinone:consumer:<consumer_id>", "qwen-allinone:held:<consumer_id>",
                 "qwen-allinone:consumers", "qwen-allinone:reconciler", "qwen-allinone:suspects",
                 "qwen-allinone:resends"):
        assert name in keys.__doc__  # every key in one module (jobqueue/keys.py)


def test_a_conversation_is_scoped_by_its_tenant():
    assert JobRequest(text="hi", conversation_id="user-42").conversation_scope == "user-42"
    assert JobRequest(text="hi", conversation_id="user-42", tenant="acme").conversation_scope == "acme/user-42"
    assert JobRequest(text="hi", tenant="acme").conversation_scope is None
    with pytest.raises(ValidationError, match="tenant"):
        JobRequest(text="hi", tenant="acme/other")


@pytest.mark.parametrize("field", ["submitted_at", "start_by"])
@pytest.mark.parametrize("value", [-1e308, -1.0, 1e12])
def test_absurd_timestamps_are_an_invalid_message(field, value):
    # A duration computed from -1e308 overflows to infinity: the record could not be written.
    message = {"request": {"text": "hi"}, "submitted_at": 1.0, "start_by": 2.0, "timeout_s": 5.0, field: value}
    with pytest.raises(ValidationError, match=field):
        JobMessage.model_validate(message)


def test_job_ids_are_random_uuid4():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 and is_job_id(i) for i in ids)
    assert not is_job_id("not-a-uuid")
    assert not is_job_id("../../etc")


def test_status_lifecycle():
    assert not JobStatus.QUEUED.is_final and not JobStatus.RUNNING.is_final
    finals = {s for s in JobStatus if s.is_final}
    assert finals == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.EXPIRED,
                      JobStatus.CANCELLED}


@pytest.mark.parametrize("text", ["", "   ", "\n\t  \n", "\x00\x01"])
def test_empty_text_is_rejected(text):
    with pytest.raises(ValidationError, match="text"):
        validate({"text": text})


def test_too_long_text_names_the_limit():
    with pytest.raises(ValidationError) as err:
        validate({"text": "好" * 11}, limit=10)
    problem = err.value.errors()[0]
    assert problem["loc"] == ("text",)
    assert "at most 10 characters (got 11)" in problem["msg"]
    assert validate({"text": "好" * 10}, limit=10).text == "好" * 10


def test_control_characters_and_lone_surrogates_are_cleaned():
    request = validate({"text": "a\x00b\x1bc\td\ne\ud800f"})
    assert request.text == "abc\td\ne?f"
    request.text.encode("utf-8")  # always encodable


def test_options_are_bounded():
    assert validate({"text": "hi"}).options.labels == "zh"
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 100_000}, {"temperature": -0.1},
                {"temperature": 9}, {"labels": "fr"}, {"unknown": 1}):
        with pytest.raises(ValidationError) as err:
            validate({"text": "hi", "options": bad})
        assert err.value.errors()[0]["loc"][0] == "options"


@pytest.mark.parametrize("conversation_id", ["", "a b", "x" * 129, "../x", "a/b"])
def test_conversation_id_pattern(conversation_id):
    with pytest.raises(ValidationError, match="conversation_id"):
        validate({"text": "hi", "conversation_id": conversation_id})


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        validate({"text": "hi", "urgency": 9})


def test_record_round_trips_as_json():
    request = validate({"text": "好吃", "conversation_id": "c-1", "options": {"labels": "en"}})
    record = JobRecord(
        job_id=new_job_id(), status=JobStatus.SUCCEEDED, request=request, submitted_at=1.0, start_by=2.0,
        timeout_s=30.0, sentiment=Sentiment(label="positive", confidence=0.9), reply="谢谢",
    )
    raw = record.to_json()
    assert json.loads(raw)["status"] == "succeeded"
    assert JobRecord.from_json(raw) == record


def test_confidence_must_be_a_probability():
    with pytest.raises(ValidationError):
        Sentiment(label="正面", confidence=1.5)


def test_message_validates_its_request():
    with pytest.raises(ValidationError, match="text"):
        JobMessage.model_validate(
            {"request": {"text": "x" * 50}, "submitted_at": 0, "start_by": 1, "timeout_s": 1},
            context={"max_input_chars": 10},
        )


@pytest.mark.parametrize("text", ["送餐太慢了", "\ud800 a lone surrogate"])
def test_the_wire_serializer_round_trips_any_text(text):
    """UTF-8 where it can be; a lone surrogate, which UTF-8 cannot hold (a foreign message put back
    to wait), escaped as kombu's own JSON does, rather than an error."""
    from kombu.serialization import dumps, loads

    content_type, encoding, data = dumps({"text": text}, serializer=CELERY_WIRE_CONFIG["task_serializer"])
    sent = data.encode(encoding)  # what kombu's producer does with a serializer's text
    assert loads(sent, content_type, encoding) == {"text": text}


def test_only_json_crosses_the_wire():
    from kombu.serialization import registry

    assert CELERY_WIRE_CONFIG["accept_content"] == ["json"]
    assert registry.name_to_type[CELERY_WIRE_CONFIG["task_serializer"]] == "application/json"
