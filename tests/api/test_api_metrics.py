"""Job outcomes counted into Redis by the worker, and their Prometheus exposition (fakeredis)."""

from __future__ import annotations

import time

import fakeredis
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer.api.metrics import build_registry
from producer.client import Client
from jobqueue.protocol import (
    job_key,
    METRICS_JOBS_KEY,
    JobRecord,
    JobStatus,
    Timings,
    bucket_field,
    metrics_counted_key,
    metrics_stage_key,
    new_job_id,
)
from jobqueue.settings import QueueSettings
from producer.settings import ApiSettings
from jobqueue.store import JobStore


@pytest.fixture
def fake():
    return fakeredis.FakeRedis()


@pytest.fixture
def store(fake):
    return JobStore(fake, ttl_s=60)


def record(status: JobStatus, **timings_ms) -> JobRecord:
    return JobRecord(job_id=new_job_id(), status=status, request={"text": "hi"}, submitted_at=time.time(),
                     timings=Timings(**timings_ms))


def test_bucket_is_the_smallest_bound_that_holds_the_value():
    assert bucket_field(0.0) == "le:0.05"
    assert bucket_field(0.05) == "le:0.05"
    assert bucket_field(0.051) == "le:0.1"
    assert bucket_field(600) == "le:600"
    assert bucket_field(601) == "le:+Inf"


def test_a_final_record_is_counted_once_with_each_stage_that_ran(store, fake):
    done = record(JobStatus.SUCCEEDED, queue_wait_ms=20, sentiment_ms=80, history_ms=1, reply_ms=700, total_ms=801)
    assert store.put(done) is True
    assert store.put(done) is False  # a second final write of the same job
    fake.delete(job_key(done.job_id))  # even one that finds the record gone is not counted again
    assert store.put(done) is True
    assert fake.hgetall(METRICS_JOBS_KEY) == {b"succeeded": b"1"}
    reply = fake.hgetall(metrics_stage_key("reply"))
    assert (reply[b"le:1"], reply[b"count"], float(reply[b"sum"])) == (b"1", b"1", pytest.approx(0.7))
    assert fake.hget(metrics_stage_key("queue_wait"), "le:0.05") == b"1"
    assert 0 < fake.ttl(metrics_counted_key(done.job_id)) <= 60

    expired = record(JobStatus.EXPIRED, total_ms=700_000)  # never ran: only its total
    store.put(expired)
    metrics = store.read_metrics()
    assert metrics.jobs_by_status == {"succeeded": 1, "expired": 1}
    assert metrics.stages["total"].count == 2 and metrics.stages["total"].buckets == {"1": 1, "+Inf": 1}
    assert metrics.stages["reply"].count == 1 and metrics.stages["reply"].sum_s == pytest.approx(0.7)


def test_unfinished_records_are_not_counted(store, fake):
    store.put(record(JobStatus.RUNNING, queue_wait_ms=5))
    assert fake.keys("qwen-allinone:metrics*") == []


def test_exposition_is_cumulative_with_every_final_status(store, fake):
    store.put(record(JobStatus.SUCCEEDED, queue_wait_ms=10, sentiment_ms=40, reply_ms=300, total_ms=350))
    store.put(record(JobStatus.SUCCEEDED, queue_wait_ms=10, sentiment_ms=40, reply_ms=3000, total_ms=3050))
    store.put(record(JobStatus.TIMED_OUT, queue_wait_ms=10, total_ms=41_000))
    fake.rpush("qwen-allinone", "m1", "m2")
    client = Client(settings=QueueSettings(redis_url="redis://127.0.0.1:1/0"), redis_client=fake)
    text = generate_latest(build_registry(client)).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    assert samples[("qwen_allinone_queue_depth", ())] == 2
    assert samples[("qwen_allinone_jobs_total", (("status", "succeeded"),))] == 2
    assert samples[("qwen_allinone_jobs_total", (("status", "timed_out"),))] == 1
    assert samples[("qwen_allinone_jobs_total", (("status", "failed"),))] == 0
    reply = {labels[0][1]: value for (name, labels), value in samples.items()
             if name == "qwen_allinone_stage_seconds_bucket" and ("stage", "reply") in labels}
    assert (reply["0.25"], reply["0.5"], reply["2.5"], reply["5.0"], reply["+Inf"]) == (0, 1, 1, 2, 2)
    assert samples[("qwen_allinone_stage_seconds_count", (("stage", "total"),))] == 3
    assert samples[("qwen_allinone_stage_seconds_sum", (("stage", "total"),))] == pytest.approx(44.4)


def test_api_key_setting_empty_means_none(monkeypatch):
    monkeypatch.setenv("API_KEY", "")
    assert ApiSettings().api_key is None
    monkeypatch.setenv("API_KEY", "s3cret-key-0123456789")
    assert ApiSettings().api_key.get_secret_value() == "s3cret-key-0123456789"
    assert "s3cret-key-0123456789" not in repr(ApiSettings())
