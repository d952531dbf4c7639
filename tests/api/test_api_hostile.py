"""Hostile bodies get clear 4xx answers, never a 500 (the gateway in process; nothing reaches Redis)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from producer.api import create_app
from producer.settings import ApiSettings


@pytest.fixture(scope="module")
def gateway() -> TestClient:
    # Every request here is refused before the Client would send; the URL is never contacted.
    app = create_app(ApiSettings(redis_url="redis://127.0.0.1:1/0", max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def post(gateway: TestClient, body: bytes | object):
    return gateway.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("body", "field", "kind"), [
    (b'{"text": "x", "temperature": 1e999}', "temperature", "finite_number"),
    (b'{"text": "x", "temperature": NaN}', "temperature", "finite_number"),
    (b'{"text": "x", "max_new_tokens": -Infinity}', "max_new_tokens", None),
    (b'{"text": "x", "conversation_id": "\\ud800"}', "conversation_id", "string_unicode"),
    (b'{"text": "x", "extra": "\\ud800"}', "extra", "extra_forbidden"),
    (b'{"text": "x", "extra": 1e999}', "extra", "extra_forbidden"),
])
def test_unprintable_input_gets_422_naming_the_field(gateway, body, field, kind):
    response = post(gateway, body)
    assert response.status_code == 422, response.text
    [problem] = [p for p in response.json()["detail"] if p["loc"][-1] == field]
    assert kind is None or problem["type"] == kind
    assert problem["msg"]


def test_a_key_that_is_a_lone_surrogate_gets_422(gateway):
    response = post(gateway, b'{"text": "x", "\\ud800": 1}')
    assert response.status_code == 422
    response.content.decode("utf-8")  # the answer itself is valid UTF-8


def test_a_body_over_the_limit_gets_413_by_its_length(gateway):
    response = post(gateway, b'{"text": "' + b"a" * 5000 + b'"}')
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large" and "MAX_BODY_BYTES (4096 bytes)" in response.json()["message"]


def test_a_chunked_body_over_the_limit_gets_413(gateway):
    def chunks():  # no Content-Length: the gateway counts what it reads
        for _ in range(1000):
            yield b"a" * 10_000

    response = post(gateway, chunks())
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
