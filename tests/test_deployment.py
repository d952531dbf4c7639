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
    assert grace > WorkerSettings().hard_time_limit_s


def test_image_uses_cpu_torch_and_the_documented_worker_command():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert '"celery", "-A", "worker.app", "worker", "--concurrency", "1"' in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert "celery -A worker.app worker --concurrency 1" in readme


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", tests_section, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == command
