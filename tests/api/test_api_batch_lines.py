"""POST /v1/batches with a JSON lines body (#30 item 4): one whole job request a line, each with its own
options; a bad line refuses the batch (422 naming its line number and field) and nothing is queued; the
limits (MAX_BATCH_ITEMS, MAX_BATCH_BODY_BYTES) named when passed.

On the shared Redis (REDIS_URL): each test is a tenant of its own and counts its records."""

from __future__ import annotations

import json

import pytest
import redis

from jobqueue.batches import BatchStore
from tests.support.batches import new_tenant, tenant_app, tenant_batches, tenant_records


@pytest.fixture
def db(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _lines(*jobs: dict | str) -> bytes:
    return "".join((job if isinstance(job, str) else json.dumps(job, ensure_ascii=False)) + "\n"
                   for job in jobs).encode()


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl",
                                          "application/x-ndjson; charset=utf-8"])
def test_each_line_is_a_whole_job_with_its_own_options(redis_url, db, content_type):
    tenant, headers = new_tenant()
    body = _lines({"text": "送餐太慢了", "labels": "zh3"}, "", {"text": "The room was clean.", "labels": "en",
                                                                "max_new_tokens": 16, "priority": "bulk"},
                  {"text": "服务一般", "temperature": 0})
    with tenant_app(redis_url, tenant) as http:
        response = http.post("/v1/batches", content=body, headers={**headers, "Content-Type": content_type})
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["jobs"] == 3 and response.headers["location"] == accepted["location"]
        status = http.get(accepted["location"], headers=headers).json()
    assert (status["jobs"], sum(status["counts"].values())) == (3, 3)
    batch = BatchStore(db, 60).get(accepted["batch_id"])
    records = {record.job_id: record for record in tenant_records(db, tenant)}
    jobs = [records[job_id].request for job_id in batch.job_ids]  # in line order
    assert [(job.text, job.options.labels, job.options.max_new_tokens, job.options.temperature, job.priority)
            for job in jobs] == [("送餐太慢了", "zh3", None, None, "bulk"), ("The room was clean.", "en", 16, None, "bulk"),
                                 ("服务一般", "zh", None, 0.0, "bulk")]


def test_a_bad_line_refuses_the_whole_batch_naming_its_line_and_field(redis_url, db):
    tenant, headers = new_tenant()
    body = _lines(
        {"text": "好"},                                       # 1
        {"text": "长" * 2001},                                # 2: too long
        "{not json",                                          # 3
        {"text": "好", "max_new_tokens": "8"},                # 4: a string for a number
        {"text": "好", "conversation_id": "c1"},              # 5: not in a batch
        {"text": "好", "priority": "interactive"},            # 6: always bulk
        "[1, 2]",                                             # 7: not an object
        {"max_new_tokens": 8},                                # 8: no text
        {"text": "   "},                                      # 9: blank
    )
    with tenant_app(redis_url, tenant) as http:
        response = http.post("/v1/batches", content=body,
                             headers={**headers, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 422, response.text
    problems = [(problem["loc"], problem["msg"]) for problem in response.json()["detail"]]
    assert [loc for loc, _ in problems] == [
        ["body", "line", 2, "text"], ["body", "line", 3], ["body", "line", 4, "max_new_tokens"],
        ["body", "line", 5, "conversation_id"], ["body", "line", 6, "priority"], ["body", "line", 7],
        ["body", "line", 8, "text"], ["body", "line", 9, "text"]]
    messages = [message for _, message in problems]
    assert messages[0] == "line 2: text: must be at most 2000 characters (got 2001)"  # POST /v1/jobs's rule
    assert messages[1].startswith("line 3: not a JSON object (")
    assert messages[2] == "line 4: max_new_tokens: must be a JSON number"
    assert messages[3].startswith("line 5: conversation_id: not taken in a batch")
    assert messages[4] == "line 6: priority: must be bulk (a batch's jobs always go to the bulk lane)"
    assert messages[5] == "line 7: must be a JSON object (a job), not list"
    assert messages[6] == "line 8: text: Field required"
    assert messages[7] == "line 9: text: must contain non-whitespace text"
    assert tenant_records(db, tenant) == [] and tenant_batches(db, tenant) == []


@pytest.mark.parametrize("body, message", [
    (b"", "the body has no job"),
    (b"\n \n", "the body has no job"),
    (_lines(*[{"text": "好"}] * 4), "the body has 4 jobs (lines), over MAX_BATCH_ITEMS (3)"),
    (b'{"text": "\xff"}\n', "line 1: not a JSON object (not UTF-8)"),
    (b"[" * 100_000 + b"]" * 100_000, "line 1: not a JSON object (nested too deep)"),
    (b'{"text": "x", "temperature": NaN}', "line 1: temperature:"),
    (b'{"text": "x", "\\ud800": 1e999}', "line 1: "),
])
def test_limits_and_unreadable_lines_are_422_naming_them_never_500(redis_url, db, body, message):
    tenant, headers = new_tenant()
    with tenant_app(redis_url, tenant, max_batch_items=3) as http:
        response = http.post("/v1/batches", content=body, headers={**headers, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"].startswith(message), response.text
    assert tenant_records(db, tenant) == []


def test_a_body_over_the_batch_limit_is_413_naming_it(redis_url, db):
    tenant, headers = new_tenant()
    body = _lines(*[{"text": "好" * 500}] * 10)  # about 15 kB
    with tenant_app(redis_url, tenant, max_batch_body_bytes=4096) as http:
        response = http.post("/v1/batches", content=body, headers={**headers, "Content-Type": "application/x-ndjson"})
        unauthorized = http.post("/v1/batches", content=_lines({"text": "好"}),
                                 headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 413 and response.json()["code"] == "body_too_large"
    assert "MAX_BATCH_BODY_BYTES (4096 bytes)" in response.json()["message"]
    assert unauthorized.status_code == 401
    assert tenant_records(db, tenant) == []


def test_the_json_form_names_max_batch_items_too(redis_url, db):
    tenant, headers = new_tenant()
    with tenant_app(redis_url, tenant, max_batch_items=3) as http:
        response = http.post("/v1/batches", json={"texts": ["好"] * 4}, headers=headers)
        schema = http.get("/openapi.json").json()["components"]["schemas"]["SubmitBatch"]["properties"]["texts"]
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "texts"]
    assert problem["msg"] == "must hold at most 3 texts (MAX_BATCH_ITEMS), not 4: split it into batches"
    assert (schema["minItems"], schema["maxItems"]) == (1, 3)
    assert tenant_records(db, tenant) == []


def test_a_chunked_body_over_the_batch_limit_is_413_naming_it(redis_url, db):
    tenant, headers = new_tenant()
    chunks = [_lines({"text": "好" * 500})] * 10  # about 15 kB, sent without a Content-Length
    with tenant_app(redis_url, tenant, max_batch_body_bytes=4096) as http:
        response = http.post("/v1/batches", content=iter(chunks),
                             headers={**headers, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 413, response.text
    assert response.json()["message"] == "the request body is over MAX_BATCH_BODY_BYTES (4096 bytes)"
    assert tenant_records(db, tenant) == []
