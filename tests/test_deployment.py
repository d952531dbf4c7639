"""The deployment files keep the promises the README makes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
    assert worker["environment"]["REDIS_URL"].endswith("@redis:6379/0")
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
    assert services["flower"]["environment"]["CELERY_BROKER_URL"].startswith("${BROKER_URL:-redis://")
    for name in ("worker", "api"):
        assert services[name]["depends_on"]["rabbitmq"]["required"] is False, name


# The images install only locked, hashed files (issue #31 item 5: "no lock file or hashes").
LOCKS = ROOT / "requirements"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def lock_entries(name: str) -> dict[str, tuple[str, list[str]]]:
    """A lock file's entries: {normalised name: (version, hashes)}. Fails on a line that is not a pinned
    requirement (an index, a -e, a URL, a range)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (LOCKS / name).read_text()
    entries: dict[str, tuple[str, list[str]]] = {}
    for logical in re.sub(r"\\\n", " ", text).splitlines():
        line = logical.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split()
        requirement = Requirement(spec)
        assert re.fullmatch(r"==[^,*]+", str(requirement.specifier)), f"{name}: {spec} is not pinned"
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o) for o in options), \
            f"{name}: {spec} has no --hash, or something else on its line: {options}"
        entries[canonicalize_name(requirement.name)] = (str(requirement.specifier)[2:], options)
    return entries


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments left out) per stage name."""
    stages: dict[str, list[str]] = {}
    current = stages.setdefault("(before any FROM ... AS name)", [])
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if stage := re.fullmatch(r"FROM \S+ AS (\w+)", line):
            current = stages.setdefault(stage.group(1), [])
        elif line and not line.startswith("#"):
            current.append(line)
    return {name: lines for name, lines in stages.items() if lines or name != "(before any FROM ... AS name)"}


def project_requirements(*extras: str) -> list:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = project["project"]["dependencies"] + [r for e in extras for r in project["project"]["optional-dependencies"][e]]
    return [Requirement(r) for r in listed + project["build-system"]["requires"]]


@pytest.mark.parametrize("lock, extras", [("gateway.lock", ()), ("worker.lock", ("worker",)),
                                          ("worker-llama.lock", ("worker", "llama"))])
def test_each_lock_pins_every_package_with_hashes_and_covers_the_project_s_dependencies(lock, extras):
    from packaging.utils import canonicalize_name

    entries = lock_entries(lock)
    for requirement in project_requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{lock} lacks {requirement} (pyproject.toml): run bash requirements/lock.sh"
        for extra in requirement.extras:  # celery[redis]: the extra's own packages are locked too
            assert canonicalize_name(extra) in entries, f"{lock} lacks {requirement}'s {extra}"
        assert requirement.specifier.contains(entries[name][0], prereleases=True), \
            f"{lock} pins {name}=={entries[name][0]}, outside pyproject.toml's {requirement}"


def test_the_worker_s_torch_is_the_cpu_build_and_the_gateway_has_none():
    worker, alone = lock_entries("worker.lock"), lock_entries("torch-cpu.lock")
    assert worker["torch"][0] == "2.13.0+cpu"
    assert alone == {"torch": worker["torch"]}  # installed first, then found installed by worker.lock's step
    for lock in ("worker.lock", "worker-llama.lock"):
        assert not [name for name in lock_entries(lock) if name.startswith(("nvidia-", "cuda-", "triton"))], lock
    gateway = lock_entries("gateway.lock")
    assert not {"torch", "transformers", "accelerate", "llama-cpp-python", "numpy"} & set(gateway)


def test_the_dockerfile_installs_only_locked_hashed_files():
    stages = dockerfile_stages()
    assert set(stages) == {"base", "gateway", "worker"}
    for name, lines in stages.items():
        for line in lines:
            for install in re.findall(r"pip install ([^&;]*)", line):
                # Either a lock with --require-hashes, or the project itself with nothing else.
                assert ("--require-hashes" in install and re.search(r"-r \S*requirements/", install)
                        or "-r " in install and "$lock" in install and "--require-hashes" in install
                        or install.split() == ["--no-deps", "--no-build-isolation", "."]), f"{name}: pip install {install}"
    worker = " ".join(stages["worker"])
    assert (f"--require-hashes --no-deps --index-url {PYTORCH_CPU_INDEX} -r requirements/torch-cpu.lock"
            in " ".join(worker.split()))
    assert "requirements/worker.lock" in worker and "requirements/worker-llama.lock" in worker
    assert "--no-deps --no-build-isolation ." in worker


def test_the_gateway_image_has_no_torch_and_compose_runs_the_gateway_from_it():
    gateway = " ".join(dockerfile_stages()["gateway"])
    assert "requirements/gateway.lock" in gateway
    assert "torch" not in gateway and "worker" not in gateway.replace("--no-deps", "")
    assert '"uvicorn", "--factory", "producer.api:create_app"' in gateway
    services = compose()["services"]
    assert services["api"]["build"]["target"] == "gateway"
    assert services["worker"]["build"]["target"] == "worker"


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def test_compose_requires_the_passwords_and_every_service_uses_redis_s():
    services = compose()["services"]
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD}"
    redis = services["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    # The healthcheck logs in too (redis-cli reads REDISCLI_AUTH), and waits for PONG, not NOAUTH.
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    assert "PONG" in " ".join(services["redis"]["healthcheck"]["test"])
    urls = [s for s in _strings(services) if "redis://" in s]
    assert {"worker", "api", "flower"} <= {name for name, service in services.items()
                                           if any("redis://" in s for s in _strings(service))}
    for url in urls:
        assert re.search(r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:6379/", url), url
    # No password has a default: a variable of a name with PASSWORD, a key or a secret is required or empty.
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{\w*(PASSWORD|SECRET)\w*:-[^}]", text)


SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _schema(**settings) -> dict:
    from producer.api.app import create_app
    from producer.settings import ApiSettings

    return create_app(ApiSettings(callback_secret=SECRET, **settings)).openapi()


def test_openapi_json_shows_no_operator_configuration(redis_url):
    """/openapi.json needs no key: it shows what a client may send, not how the operator set the
    gateway up (issue #31 item 5: it listed the allowed callback hosts)."""
    import json

    from producer.settings import ApiSettings

    plain = _schema(redis_url=redis_url, api_key="a-key-of-16-chars", callback_allowed_hosts="hooks.example.com")
    operator = dict(redis_url=redis_url, callback_allowed_hosts="internal-hooks.corp.example,10.1.2.3:9000",
                    api_keys="zz-tenant-one=k" + "1" * 20 + " hooks.tenant-one.example:8443,zz-tenant-two=" + "2" * 20,
                    max_body_bytes=123457, max_event_streams=4321, events_timeout_s=765.5, result_ttl_s=98765,
                    queue_timeout_s=4567, job_timeout_s=43.5, max_queue=5432, callback_retry_for_s=3456,
                    callback_timeout_s=17.5, callback_max_concurrent=77, callback_max_pending_per_host=888,
                    callback_max_pending_per_tenant=999)
    configured = _schema(**operator)
    # Nothing an operator sets changes the schema: not the hosts, the tenants, the limits or the timeouts.
    assert configured == plain
    text = json.dumps(configured)
    for value in ("internal-hooks", "10.1.2.3", "tenant-one", "tenant-two", "123457", "4321", "765.5", "98765",
                  "5432", "3456", "17.5", "888", "999"):
        assert value not in text, value
    # ... nor names its settings.
    names = {name.upper() for name in (*ApiSettings.model_fields, *WorkerSettings.model_fields)}
    assert not {name for name in names if re.search(rf"\b{name}\b", text)}
    # The limits of the fields a client sends stay: the text's length, the options' ranges.
    limited = _schema(redis_url=redis_url, max_input_chars=1234)["components"]["schemas"]["SubmitJob"]["properties"]
    assert limited["text"]["maxLength"] == 1234 and "1234 characters" in limited["text"]["description"]
    assert limited["max_new_tokens"]["anyOf"][0]["maximum"] == 1024
