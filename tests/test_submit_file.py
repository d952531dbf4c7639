"""``qwen-allinone submit-file``: a bad line refuses the file (fast); 50 rows through a real worker to a
results CSV, and a run resumed after a kill submits nothing again (slow); 1,000 rows (slow)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import redis

from jobqueue.protocol import job_key
from producer.cli import EXIT_INVALID, EXIT_WAIT_TIMEOUT, main
from producer.client import Client
from tests.conftest import start_worker

REVIEWS = ["送餐太慢了，菜都凉了", "味道很好，下次还来", "服务一般", "The room was clean.", "差评，再也不来了"]


def _write_csv(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "review"])
        writer.writerows([i, text] for i, text in enumerate(texts))
    return path


def _rows(out: Path) -> list[dict]:
    with open(out, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_bad_line_is_named_and_nothing_is_submitted(redis_url, tmp_path, capsys, monkeypatch):
    texts = [f"第{i}条" for i in range(10)]
    texts[6] = "  "
    source = _write_csv(tmp_path / "reviews.csv", texts)
    submitted = []
    monkeypatch.setattr(Client, "submit", lambda self, *a, **k: submitted.append(a))
    code = main(["--redis-url", redis_url, "submit-file", str(source), "--out", str(tmp_path / "out.csv")])
    assert code == EXIT_INVALID
    # Line 8 of the file: the header, then rows 0..5, then the blank one.
    assert "reviews.csv:8: text: must contain non-whitespace text" in capsys.readouterr().err
    assert submitted == [] and not (tmp_path / "out.csv").exists()

    code = main(["--redis-url", redis_url, "submit-file", str(source), "--out", str(tmp_path / "o.csv"),
                 "--column", "text"])
    assert code == EXIT_INVALID and "--column 'text'" in capsys.readouterr().err


def _sidecar_ids(out: Path) -> list[str]:
    return [json.loads(line)["job_id"] for line in Path(f"{out}.jobs.jsonl").read_text().splitlines()[1:]]


def test_an_idempotency_key_names_the_run(redis_url, tmp_path, capsys):
    """Run again under the key (to any --out): the same jobs; a new key: new jobs; a resume under another
    key is refused. No worker needed: the runs time out with their jobs queued."""
    source = _write_csv(tmp_path / "reviews.csv", [f"{text} #{i}" for i, text in enumerate(REVIEWS)])

    def run(out: str, *key: str) -> int:
        return main(["--redis-url", redis_url, "submit-file", str(source), "--out", str(tmp_path / out),
                     "--no-progress", "--timeout", "0.2", *key])

    assert run("first.csv", "--idempotency-key", "run-1") in (0, EXIT_WAIT_TIMEOUT)
    assert run("again.csv", "--idempotency-key", "run-1") in (0, EXIT_WAIT_TIMEOUT)
    assert run("fresh.csv", "--idempotency-key", "run-2") in (0, EXIT_WAIT_TIMEOUT)
    first, again, fresh = (_sidecar_ids(tmp_path / name) for name in ("first.csv", "again.csv", "fresh.csv"))
    assert len(set(first)) == 5 and again == first and not set(fresh) & set(first)
    assert run("first.csv") in (0, EXIT_WAIT_TIMEOUT) and _sidecar_ids(tmp_path / "first.csv") == first  # kept
    capsys.readouterr()
    assert run("first.csv", "--idempotency-key", "run-3") == EXIT_INVALID
    err = capsys.readouterr().err
    assert "--idempotency-key: " in err and "run-1" not in err
    assert run("long.csv", "--idempotency-key", "k" * 254) == EXIT_INVALID  # with ":4" over 255


@pytest.fixture(scope="module")
def file_worker(redis_url, tiny_model_dir, tmp_path_factory):
    env = {"REDIS_URL": redis_url, "MODEL": str(tiny_model_dir), "TORCH_THREADS": "1", "CACHE_TTL_S": "0"}
    worker = start_worker("worker.app", tmp_path_factory.mktemp("logs") / "file-worker.log", env, name="file")
    yield worker
    worker.stop()


def _run(redis_url: str, source: Path, out: Path, *extra: str) -> int:
    return main(["--redis-url", redis_url, "submit-file", str(source), "--out", str(out), "--max-new-tokens", "2",
                 "--no-progress", *extra])


@pytest.mark.slow
def test_fifty_rows_to_a_results_csv_and_a_resume_submits_nothing_new(redis_url, file_worker, tmp_path,
                                                                        monkeypatch):
    texts = [f"{REVIEWS[i % len(REVIEWS)]} #{i}" for i in range(50)]
    source, out = _write_csv(tmp_path / "reviews.csv", texts), tmp_path / "results.csv"
    assert _run(redis_url, source, out, "--in-flight", "16") == 0
    rows = _rows(out)
    assert [row["text"] for row in rows] == texts and [int(row["index"]) for row in rows] == list(range(50))
    assert [int(row["line"]) for row in rows] == list(range(2, 52))
    assert {row["status"] for row in rows} == {"succeeded"} and all(row["label"] for row in rows)
    sidecar = Path(f"{out}.jobs.jsonl")
    job_ids = [json.loads(line)["job_id"] for line in sidecar.read_text().splitlines()[1:]]
    assert len(set(job_ids)) == 50

    # A kill part way: the last 30 rows not written yet, the last 10 job ids not in the sidecar
    # (queued, but the run died before it wrote them down).
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:20])
        handle.write('47,49,"a row cut by the kill')
    sidecar.write_text("\n".join(sidecar.read_text().splitlines()[:41]) + "\n")
    client = redis.Redis.from_url(redis_url)
    jobs_before = len(client.keys(job_key("*")))
    assert _run(redis_url, source, out) == 0
    assert _rows(out) == rows  # the same rows, of the same jobs, in order
    resumed = [json.loads(line)["job_id"] for line in sidecar.read_text().splitlines()[1:]]
    assert resumed == job_ids  # the 10 re-submitted found their first jobs (idempotency keys)
    assert len(client.keys(job_key("*"))) == jobs_before

    # Once done, a rerun submits nothing at all.
    monkeypatch.setattr(Client, "submit", lambda *a, **k: pytest.fail("submitted again"))
    assert _run(redis_url, source, out) == 0 and _rows(out) == rows


@pytest.mark.slow
def test_a_thousand_lines(redis_url, file_worker, tmp_path, figures):
    texts = [f"{REVIEWS[i % len(REVIEWS)]} 第{i}行" for i in range(1000)]
    source = tmp_path / "reviews.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "results.csv"
    started = time.monotonic()
    assert _run(redis_url, source, out, "--timeout", "300") == 0
    figures["seconds"] = round(time.monotonic() - started, 1)
    rows = _rows(out)
    assert [row["text"] for row in rows] == texts and [int(row["line"]) for row in rows] == list(range(1, 1001))
    assert {row["status"] for row in rows} == {"succeeded"}
