"""End to end: producer → real Redis → real `celery -A worker.app` subprocess → record → client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobqueue.protocol import LABEL_SETS, JobRecord, JobStatus, conversation_key, job_key, new_job_id
from tests.conftest import BOTH_BROKERS, ROOT, start_worker

pytestmark = [pytest.mark.slow, BOTH_BROKERS]


@pytest.fixture(scope="module")
def worker(worker_env, tmp_path_factory):
    process = start_worker("worker.app", tmp_path_factory.mktemp("logs") / "worker.log", worker_env, name="main")
    yield process
    process.stop()


@pytest.fixture
def cli(redis_url, broker_url):
    """Runs ``python -m producer`` against this module's Redis and broker."""
    env = {**os.environ, "BROKER_URL": broker_url or ""}

    def run(*args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer", "--redis-url", redis_url, *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    return run


def test_job_succeeds_with_a_complete_record(worker, make_client, redis_client):
    client = make_client()
    job_id = client.submit("送餐太慢了，等了两个小时，菜都凉了", max_new_tokens=20)
    record = client.wait(job_id, timeout=60)

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.sentiment.label in LABEL_SETS["zh"]
    assert 0.0 <= record.sentiment.confidence <= 1.0
    assert isinstance(record.reply, str) and record.stop_reason in ("eos", "length")
    assert record.truncated is (record.stop_reason == "length")
    t = record.timings
    assert all(ms is not None and ms >= 0 for ms in (t.queue_wait_ms, t.sentiment_ms, t.history_ms, t.reply_ms))
    assert t.total_ms >= t.queue_wait_ms + t.sentiment_ms + t.reply_ms - 1
    assert record.tokens.sentiment_prompt_tokens > 0 and record.tokens.reply_prompt_tokens > 0
    assert 1 <= record.tokens.generated_tokens <= 20
    assert record.model_id == worker_model(worker)
    assert record.worker.startswith("main-")
    assert record.attempts == 1 and record.error is None
    assert record.submitted_at <= record.started_at <= record.finished_at
    ttl = redis_client.ttl(job_key(job_id))
    assert 0 < ttl <= client.settings.result_ttl_s
    # The worker logs the outcome just after the final write, which wakes the client at once.
    worker.wait_for_log(f"job={job_id} status=succeeded", timeout=10)


def worker_model(worker) -> str:
    for line in worker.log().splitlines():
        if " loaded (dtype=" in line:
            return line.split("model ", 1)[1].split(" loaded", 1)[0]
    raise AssertionError("no model line in the worker log")


def test_english_labels(worker, make_client):
    client = make_client()
    record = client.wait(client.submit("The food was great", labels="en", max_new_tokens=4), timeout=60)
    assert record.status is JobStatus.SUCCEEDED
    assert record.sentiment.label in ("positive", "negative")


def test_unknown_job_is_not_found_never_queued(worker, make_client, cli):
    assert make_client().get(new_job_id()) is None
    result = cli("get", new_job_id())
    assert result.returncode == 3 and "not found" in result.stderr


def test_conversation_history_is_used_for_the_next_turn(worker, make_client, redis_client, broker):
    client = make_client()
    conversation = f"conv-{broker}"  # one per run of this module: both share the Redis
    text = "我今天很开心"
    alone = client.wait(client.submit(text, max_new_tokens=8), timeout=60)
    first = client.wait(client.submit("送餐太慢了", conversation_id=conversation, max_new_tokens=8), timeout=60)
    second = client.wait(client.submit(text, conversation_id=conversation, max_new_tokens=8), timeout=60)
    assert first.status is second.status is alone.status is JobStatus.SUCCEEDED
    # Same text, same system prompt: the only difference is turn 1 in the history.
    assert second.tokens.reply_prompt_tokens > alone.tokens.reply_prompt_tokens
    stored = [json.loads(t) for t in redis_client.lrange(conversation_key(conversation), 0, -1)]
    assert [t["user"] for t in stored] == ["送餐太慢了", text]
    assert stored[0]["assistant"] == first.reply
    # The sentiment never sees the history: same text, same prompt length.
    assert second.tokens.sentiment_prompt_tokens == alone.tokens.sentiment_prompt_tokens


def test_cli_run_prints_sentiment_then_reply(worker, cli):
    result = cli("run", "很快，好吃，味道足，量大", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "LLM 情感判断: " in lines[0] and lines[0].split("LLM 情感判断: ")[1].split()[0] in LABEL_SETS["zh"]
    assert lines[1].startswith("🤖")
    assert "queued" in result.stderr


def test_cli_submit_get_wait_json(worker, cli):
    submitted = cli("submit", "服务很好", "--json", "--labels", "en")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    waited = cli("wait", job_id, "--json", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    record = JobRecord.from_json(waited.stdout)
    assert record.job_id == job_id and record.status is JobStatus.SUCCEEDED
    got = cli("get", job_id)
    assert got.returncode == 0 and "status:  succeeded" in got.stdout


def test_cli_bad_input_names_the_field_and_enqueues_nothing(worker, cli, make_client):
    client = make_client()
    before = client.queue_depth()
    result = cli("submit", "x" * 2001)
    assert result.returncode == 2
    assert "text: must be at most 2000 characters (got 2001)" in result.stderr
    assert client.queue_depth() == before


def test_eval_command_runs_every_row_through_the_queue(worker, cli, tmp_path):
    data = tmp_path / "dev.csv"
    data.write_text("label,review\n1,很快，好吃\n0,太慢了\n1,服务很好\n0,再也不点了\n", encoding="utf-8")
    report = tmp_path / "report.json"
    result = cli("eval", str(data), "--report", str(report), "--limit", "4", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "on 4 rows (labels=zh); valid labels 100.0%; failed jobs 0" in result.stdout
    assert "| gold \\ predicted | 正面 | 负面 |" in result.stdout
    body = json.loads(report.read_text())
    assert len(body["rows"]) == 4 and all(row["job_id"] and row["predicted"] in LABEL_SETS["zh"]
                                          for row in body["rows"])
    worker.wait_for_log(f"job={body['rows'][0]['job_id']} status=succeeded", timeout=10)


def test_eval_replies_scores_every_prompt_through_the_queue(worker, cli, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    items = [{"id": "r1", "kind": "review", "lang": "zh", "text": "送餐太慢了，菜都凉了", "polarity": "negative"},
             {"id": "q1", "kind": "request", "lang": "en", "text": "Write a short note to my manager.",
              "polarity": None}]
    prompts.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    out = tmp_path / "replies.jsonl"
    result = cli("eval-replies", str(prompts), "--max-new-tokens", "6", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 prompts at temperature 0; failed jobs 0" in result.stdout
    assert result.stdout.splitlines()[0].split()[:3] == ["kind", "n", "usable"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["r1", "q1"]
    assert all(row["status"] == "succeeded" and row["job_id"] and row["stop_reason"] in ("eos", "length")
               and row["label"] in LABEL_SETS[row["lang"]] for row in rows)


def test_the_cli_submits_in_a_lane_and_cancels(worker, make_client, cli):
    submitted = cli("submit", "一般般吧", "--priority", "bulk", "--max-new-tokens", "4")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and make_client().get(job_id).request.priority == "bulk"
    make_client().wait(job_id, timeout=60)
    after_the_end = cli("cancel", job_id)  # nothing to cancel: the final record, exit 6
    assert after_the_end.returncode == 6 and "already ended succeeded" in after_the_end.stderr
    assert "status:  succeeded" in after_the_end.stdout
    assert cli("cancel", new_job_id()).returncode == 3
    refused = cli("submit", "好吃", "--callback-url", "http://10.0.0.1/hook")
    assert refused.returncode == 2 and "callback_url: host '10.0.0.1' is not in CALLBACK_ALLOWED_HOSTS" in refused.stderr
