"""The gateway under uvicorn, in front of real Redis and a real worker with the tiny model."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobqueue.protocol import LABEL_SETS, new_job_id
from tests.api.conftest import read_events, wait_final

pytestmark = pytest.mark.slow

LABELS = set(LABEL_SETS["zh"])


def test_submit_is_accepted_with_a_location_and_the_record_completes(http):
    response = http.post("/v1/jobs", json={"text": "送餐太慢了，菜都凉了", "conversation_id": "api-1",
                                           "max_new_tokens": 8, "min_new_tokens": 4})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["location"] == f"/v1/jobs/{body['job_id']}"
    assert body["status"] == "queued" and body["events"] == f"/v1/jobs/{body['job_id']}/events"

    record = wait_final(http, body["job_id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["sentiment"]["label"] in LABELS
    assert isinstance(record["reply"], str) and record["reply"]
    assert 4 <= record["tokens"]["generated_tokens"] <= 8
    assert record["request"]["conversation_id"] == "api-1"
    assert record["worker"].startswith("api-")


@pytest.mark.parametrize("path", ["/v1/jobs/{id}", "/v1/jobs/{id}/events"])
@pytest.mark.parametrize("job_id", [new_job_id(), "not-a-job-id"])
def test_unknown_job_is_404(http, path, job_id):
    response = http.get(path.format(id=job_id))
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({"text": "x" * 2001}, "text", "must be at most 2000 characters (got 2001)"),
        ({"text": "  \n "}, "text", "must contain non-whitespace text"),
        ({"text": "ok", "max_new_tokens": 5000}, "max_new_tokens", "less than or equal to 1024"),
        ({"text": "ok", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"text": "ok", "labels": "fr"}, "labels", "'zh', 'en', 'zh3' or 'en3'"),
        ({"text": "ok", "conversation_id": "a b"}, "conversation_id", "pattern"),
        ({"text": "ok", "urgency": 1}, "urgency", "Extra inputs are not permitted"),
        ({"text": "ok", "temperature": False}, "temperature", "must be a JSON number"),
        ({"text": "ok", "max_new_tokens": "8"}, "max_new_tokens", "must be a JSON number"),
        ({}, "text", "Field required"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_the_limit(http, body, field, limit):
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", field]
    assert limit in problem["msg"]


def test_a_body_that_is_not_json_is_400(http):
    response = http.post("/v1/jobs", content=b"\xff\xfe not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "parsing the body" in response.json()["detail"]


def test_events_deliver_the_sentiment_before_the_reply_is_finished(http):
    # The longest reply (about 1.5 s on the tiny model): the worker writes the
    # sentiment, then generates for several of the gateway's 0.15 s polls.
    response = http.post("/v1/jobs", json={"text": "很快，好吃，味道足，量大", "max_new_tokens": 1024,
                                           "min_new_tokens": 1024})
    job_id = response.json()["job_id"]
    events = read_events(http, f"/v1/jobs/{job_id}/events")
    names = [event.name for event in events]

    assert names[0] == "status" and names[-1] == "done"
    assert names.count("sentiment") == 1 and names.count("done") == 1
    assert set(names) <= {"status", "queue", "sentiment", "reply", "done"}
    sentiment = events[names.index("sentiment")]
    assert sentiment.data["label"] in LABELS
    done = events[-1].data
    # Delivered while the worker was still generating: before it wrote the final record.
    assert sentiment.received_at < done["finished_at"]
    # Partial replies, from a worker that writes them, come between the sentiment and the end.
    assert all(names.index("sentiment") < i < len(names) - 1 for i, n in enumerate(names) if n == "reply")
    statuses = [event.data["status"] for event in events if event.name == "status"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    # Polling and the stream show the same record.
    assert http.get(f"/v1/jobs/{job_id}").json() == done
    assert done["sentiment"] == sentiment.data and done["tokens"]["generated_tokens"] == 1024


def test_events_of_a_finished_job_replay_its_state_and_close(http):
    job_id = http.post("/v1/jobs", json={"text": "服务很好", "max_new_tokens": 2}).json()["job_id"]
    record = wait_final(http, job_id)
    events = read_events(http, f"/v1/jobs/{job_id}/events")
    assert [event.name for event in events] == ["status", "sentiment", "done"]
    assert events[0].data == {"status": "succeeded"}
    assert events[2].data == record
    # UTF-8 JSON on the wire, readable with curl: 负面, not \u8d1f\u9762.
    raw = http.get(f"/v1/jobs/{job_id}/events").text
    assert f'event: sentiment\ndata: {{"label": "{record["sentiment"]["label"]}"' in raw


def test_healthz_reports_redis_the_worker_and_the_queue(http, api_worker):
    response = http.get("/healthz")
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["status"] == "ok" and health["redis"] == "ok"
    assert any(name.startswith(api_worker.name) for name in health["workers"])
    assert health["queue_depth"] >= 0


def _scrape(http) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_every_finished_job_and_its_stage_latencies(http):
    before = _scrape(http)
    job_id = http.post("/v1/jobs", json={"text": "太慢了", "max_new_tokens": 2}).json()["job_id"]
    record = wait_final(http, job_id)
    after = _scrape(http)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert record["status"] == "succeeded"
    assert delta("qwen_allinone_jobs_total", status="succeeded") == 1
    assert delta("qwen_allinone_jobs_total", status="failed") == 0
    assert ("qwen_allinone_queue_depth", ()) in after
    for stage, field in [("queue_wait", "queue_wait_ms"), ("sentiment", "sentiment_ms"),
                         ("reply", "reply_ms"), ("total", "total_ms")]:
        assert delta("qwen_allinone_stage_seconds_count", stage=stage) == 1
        assert delta("qwen_allinone_stage_seconds_sum", stage=stage) == pytest.approx(
            record["timings"][field] / 1000, abs=1e-3)
        assert delta("qwen_allinone_stage_seconds_bucket", stage=stage, le="+Inf") == 1


def test_openapi_docs_are_at_the_usual_place(http):
    assert "swagger" in http.get("/docs").text.lower()
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/healthz"} <= set(paths)
    assert "503" in paths["/v1/jobs"]["post"]["responses"]


def test_the_web_page_is_served(http):
    response = http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "/v1/jobs" in response.text and "LLM 情感判断" in response.text
