"""Settings come from the environment, with documented defaults and checked relations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobqueue.settings import QueueSettings
from worker.app import celery_config
import worker.settings
from worker.settings import WorkerSettings, available_cores, default_model

SETTINGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_defaults(monkeypatch):
    for name in ("REDIS_URL", "MODEL", "DTYPE", "MAX_QUEUE", "JOB_TIMEOUT_S", "TORCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    settings = WorkerSettings()
    assert settings.model == default_model()
    assert settings.dtype == "int8"
    assert settings.max_input_chars == 2000 and settings.max_queue == 1000
    assert settings.result_ttl_s == 86_400 and settings.job_timeout_s == 30
    assert settings.threads == available_cores()


@pytest.mark.parametrize(("llama_installed", "expected"), [
    (True, "Qwen/Qwen1.5-0.5B-Chat-GGUF:q4_k_m"),  # the original's model as Qwen's GGUF, on llama.cpp
    (False, "Qwen/Qwen1.5-0.5B-Chat"),  # the original's folder, on the torch engine
])
def test_the_default_model_follows_the_installed_engine(monkeypatch, llama_installed, expected):
    monkeypatch.delenv("MODEL", raising=False)
    monkeypatch.setattr(worker.settings, "llama_cpp_installed", lambda: llama_installed)
    assert WorkerSettings().model == expected
    assert WorkerSettings(model="/models/x").model == "/models/x"


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MODEL", "/models/qwen")
    monkeypatch.setenv("DTYPE", "bfloat16")
    monkeypatch.setenv("MAX_QUEUE", "5")
    monkeypatch.setenv("TORCH_THREADS", "1")
    settings = WorkerSettings()
    assert (settings.model, settings.dtype, settings.max_queue, settings.threads) == ("/models/qwen", "bfloat16", 5, 1)


def test_bad_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("DTYPE", "float8")
    with pytest.raises(ValidationError, match="dtype"):
        WorkerSettings()


def test_visibility_timeout_must_outlast_the_hard_time_limit():
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT_S"):
        WorkerSettings(job_timeout_s=100, time_limit_grace_s=10, visibility_timeout_s=60)


def test_records_must_outlive_the_longest_open_job():
    # 600 s queued + 70 s to the hard limit (30 + 10 + a 30 s join window) + 3,600 s until a
    # dead worker's job comes back.
    with pytest.raises(ValidationError, match=r"RESULT_TTL_S \(4000\) must be longer .*VISIBILITY_TIMEOUT_S \(4270 s\)"):
        WorkerSettings(result_ttl_s=4000, queue_timeout_s=600, job_timeout_s=30, time_limit_grace_s=10)
    assert WorkerSettings(result_ttl_s=4271, queue_timeout_s=600, job_timeout_s=30, time_limit_grace_s=10)


def test_celery_config_keeps_delivery_guarantees():
    settings = WorkerSettings(job_timeout_s=30, time_limit_grace_s=10, visibility_timeout_s=300)
    conf = celery_config(settings)
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["task_time_limit"] == 70  # 30 + 10 + the 30 s join window
    assert conf["broker_transport_options"]["visibility_timeout"] == 300 > conf["task_time_limit"]
    assert conf["accept_content"] == ["json"]


def test_every_setting_is_in_the_settings_table():
    table = SETTINGS_PAGE.read_text()
    for name in WorkerSettings.model_fields:
        assert re.search(rf"^\| `{name.upper()}` \|", table, re.M), f"{name.upper()} missing from docs/settings.md"
    assert set(QueueSettings.model_fields) <= set(WorkerSettings.model_fields)


def test_a_malformed_broker_url_names_the_setting():
    with pytest.raises(ValidationError, match="broker_url"):
        QueueSettings(broker_url="kafka://127.0.0.1:9092")
    with pytest.raises(ValidationError, match="MAX_QUEUE_BULK"):
        QueueSettings(broker_url="amqp://guest:guest@127.0.0.1:5672//", max_queue_bulk=5)
    assert QueueSettings(broker_url="").broker_kind == "redis"
