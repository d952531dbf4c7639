"""The llama.cpp engine in a real worker: the tiny model's GGUF file, served through the queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobqueue.protocol import LABEL_SETS, JobStatus
from tests.conftest import require_llama_cpp, start_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_worker(worker_env, tiny_gguf, tmp_path_factory):
    require_llama_cpp()
    env = {**worker_env, "MODEL": str(tiny_gguf), "BATCH_MAX": "4", "KV_TOKENS_PER_JOB": "256",
           "MAX_NEW_TOKENS": "1024"}
    process = start_worker("worker.app", tmp_path_factory.mktemp("logs") / "llama.log", env, name="llama")
    yield process
    process.stop()


def test_a_gguf_model_runs_on_llama_cpp_by_default(llama_worker, make_client, tiny_gguf):
    client = make_client()
    record = client.wait(client.submit("送餐太慢了，菜都凉了", max_new_tokens=12, temperature=0), timeout=60)
    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.sentiment.label in LABEL_SETS["zh"]
    assert record.model_id == str(tiny_gguf)
    assert record.tokens.sentiment_prompt_tokens > 0 and record.tokens.reply_prompt_tokens > 0
    assert 1 <= record.tokens.generated_tokens <= 12
    assert record.timings.sentiment_ms >= 0 and record.timings.reply_ms >= 0
    assert "engine=llama.cpp" in llama_worker.log()
    for pid in llama_worker.pool_child_pids():  # one model in memory: no torch runtime beside llama.cpp
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def test_a_batch_larger_than_the_cache_runs_in_waves(llama_worker, make_client):
    # 4 rows x 256 tokens beside the prefixes; 4 jobs of 300 new tokens need more than that together.
    client = make_client()
    jobs = [client.submit(f"第{i}单，送餐太慢了", max_new_tokens=300, min_new_tokens=300, temperature=0)
            for i in range(12)]
    records = [client.wait(job, timeout=180) for job in jobs]
    assert [r.status for r in records] == [JobStatus.SUCCEEDED] * 12, [r.error for r in records]
    assert all(r.tokens.generated_tokens == 300 for r in records)


def test_a_job_larger_than_the_whole_cache_fails_alone_naming_the_setting(llama_worker, make_client):
    client = make_client()
    big = client.submit("好吃" * 900, max_new_tokens=1024, min_new_tokens=1024, temperature=0)
    small = client.submit("好吃", max_new_tokens=4, temperature=0)
    big_record, small_record = client.wait(big, timeout=120), client.wait(small, timeout=120)
    assert big_record.status is JobStatus.FAILED
    assert "KV_TOKENS_PER_JOB" in big_record.error.message
    assert small_record.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(("engine", "model_fixture", "expected"), [
    ("llama.cpp", "tiny_model_dir", "qwen-allinone worker: cannot start: ENGINE=llama.cpp runs a .gguf file"),
    # Settings are validated when the app is created: the line names the variable and what it accepts.
    ("cuda", "tiny_gguf", "cannot start: ENGINE='cuda': Input should be 'auto', 'torch' or 'llama.cpp'"),
])
def test_an_engine_that_cannot_run_the_model_stops_the_worker_with_one_line(
        worker_env, tmp_path, request, engine, model_fixture, expected):
    if engine == "llama.cpp":
        require_llama_cpp()  # without the extra the worker's one line says to install it instead
    model = request.getfixturevalue(model_fixture)
    worker = start_worker("worker.app", tmp_path / "bad.log", {**worker_env, "MODEL": str(model), "ENGINE": engine},
                          wait_loaded=False, name="bad-engine")
    try:
        assert worker.process.wait(60) != 0
    finally:
        worker.stop()
    assert expected in worker.log()
    assert "Traceback" not in worker.log()
