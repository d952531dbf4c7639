"""The deployment files keep the promises the README makes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_redis_persists_queued_jobs():
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_worker_scales_and_outlives_its_job_on_stop():
    worker = compose()["services"]["worker"]
    # `--scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert any(volume.endswith(":/hf-cache") for volume in worker["volumes"])
    grace = int(re.fullmatch(r"(\d+)s", worker["stop_grace_period"]).group(1))
    assert grace > WorkerSettings().shutdown_drain_s


def test_image_uses_cpu_torch_and_the_documented_worker_command():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert '"celery", "-A", "worker.app", "worker", "--concurrency", "1"' in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert "celery -A worker.app worker --concurrency 1" in readme


def test_the_demo_starts_its_own_redis_where_none_answers(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "TORCH_THREADS": "1"}
    demo = subprocess.run([sys.executable, "-m", "worker.demo", "好吃", "--model", str(tiny_model_dir),
                           "--timeout", "120"], env=env, capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "started a private redis-server for this demo" in demo.stderr
    assert "LLM 情感判断" in demo.stdout
    assert "DeprecationWarning" not in demo.stderr + demo.stdout and "FutureWarning" not in demo.stderr


def test_the_demo_says_how_to_get_a_redis_where_it_cannot_start_one(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "PATH": str(tmp_path)}  # no redis-server
    demo = subprocess.run([sys.executable, "-m", "worker.demo", "好吃"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert demo.returncode == 1
    assert demo.stderr.strip().splitlines() == [
        "no Redis answers at redis://127.0.0.1:1/0: start one (sudo apt install redis-server, or docker run -p "
        "6379:6379 redis:7) or set REDIS_URL"]


def test_the_rabbitmq_profile_keeps_its_ports_local_and_every_service_reads_broker_url():
    services = compose()["services"]
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["profiles"] == ["rabbitmq"]  # not started without --profile rabbitmq
    assert rabbitmq["ports"] and all(port.startswith("127.0.0.1:") for port in rabbitmq["ports"])
    assert any(port.endswith(":15672") for port in rabbitmq["ports"])  # the management UI
    assert any(volume.endswith(":/var/lib/rabbitmq") for volume in rabbitmq["volumes"])
    for name in ("worker", "api"):
        assert "BROKER_URL" in services[name]["environment"], name
    assert "--broker=${BROKER_URL:-redis://redis:6379/0}" in services["flower"]["command"]
    for name in ("worker", "api"):
        assert services[name]["depends_on"]["rabbitmq"]["required"] is False, name
