"""deploy/k8s/: the Kubernetes manifests and their KEDA autoscaler name what the code names.

No cluster here: the YAML is parsed and held to the queue's real key names (jobqueue), the settings'
names and relations (worker/settings.py, producer/settings.py), and the images' targets and commands
(Dockerfile, docker-compose.yml).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from kombu.transport import redis as kombu_redis

from jobqueue.protocol import LANE_PRIORITY, QUEUE_NAME
from jobqueue.queue.transport import lane_keys
from producer.settings import ApiSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
#: Variables the manifests set that are not settings: each is used by another variable's $(...) or by a tool.
HELPERS = {"REDIS_PASSWORD", "HF_HOME"}


def manifests() -> dict[tuple[str, str], dict]:
    """Every object of the kustomization and its alternative, by (kind, name)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "Kustomization" and path.name != "keda-rabbitmq.yaml":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def container(kind: str, name: str) -> dict:
    (only,) = manifests()[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


def literal_env(spec: dict) -> dict[str, str]:
    """A container's variables as Kubernetes sets them without the optional secrets (unset, as by default),
    the others' values as a stand-in, and $(VAR) expanded."""
    values: dict[str, str] = {}
    for entry in spec["env"]:
        if entry.get("valueFrom", {}).get("secretKeyRef", {}).get("optional"):
            continue
        value = entry.get("value", "secret-value")
        values[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], value)
    return values


def scaled_object(file: str) -> dict:
    (scaled,) = [d for d in yaml.safe_load_all((K8S / file).read_text()) if d["kind"] == "ScaledObject"]
    return scaled


def dockerfile_cmds() -> dict[str, list[str]]:
    """The CMD of each named stage of the Dockerfile."""
    stages, current = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if stage := re.fullmatch(r"FROM \S+ AS (\w+)\s*", line):
            current = stage.group(1)
        elif line.startswith("CMD "):
            stages[current] = json.loads(line[4:])
    return stages


def test_the_kustomization_lists_every_manifest_but_the_rabbitmq_alternative():
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "keda-rabbitmq.yaml"}
    assert {kind for kind, _ in manifests()} == {"Namespace", "Service", "StatefulSet", "Deployment",
                                                 "TriggerAuthentication", "ScaledObject"}
    assert manifests()[("Namespace", kustomization()["namespace"])]


def test_the_redis_trigger_counts_every_lane_of_the_real_queue():
    lists = dict(zip(kombu_redis.PRIORITY_STEPS, lane_keys(QUEUE_NAME), strict=True))
    lanes = {lane: lists[priority] for lane, priority in LANE_PRIORITY.items()}
    assert lanes == {"interactive": "qwen-allinone", "bulk": "qwen-allinone\x06\x169"}
    scaled = scaled_object("keda-redis.yaml")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert {name: t["metadata"]["listName"] for name, t in triggers.items()} == lanes
    assert scaled["spec"]["advanced"]["scalingModifiers"]["formula"] == " + ".join(lanes)
    redis_url = literal_env(container("Deployment", "qwen-allinone-worker"))["REDIS_URL"]
    host, port, db = re.fullmatch(r"redis://:[^@]+@([\w-]+):(\d+)/(\d+)", redis_url).groups()
    namespace = kustomization()["namespace"]
    service = manifests()[("Service", host)]
    for trigger in triggers.values():
        assert trigger["type"] == "redis"
        # KEDA's operator runs in its own namespace: the address names the Service's namespace.
        assert trigger["metadata"]["address"] == f"{host}.{namespace}.svc.cluster.local:{port}"
        assert trigger["metadata"]["databaseIndex"] == db
        assert trigger["authenticationRef"]["name"] in {n for k, n in manifests() if k == "TriggerAuthentication"}
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_the_trigger_reads_the_password_the_pods_use():
    auth = manifests()[("TriggerAuthentication", "qwen-allinone-redis")]
    (secret,) = auth["spec"]["secretTargetRef"]
    for kind, name in (("Deployment", "qwen-allinone-worker"), ("StatefulSet", "redis")):
        (password,) = [e for e in container(kind, name)["env"] if e["name"] == "REDIS_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": secret["name"], "key": secret["key"]}


def test_the_rabbitmq_trigger_names_the_real_queue_and_the_workers_broker_url():
    (trigger,) = scaled_object("keda-rabbitmq.yaml")["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] == QUEUE_NAME
    env = container("Deployment", "qwen-allinone-worker")["env"]
    assert trigger["metadata"]["hostFromEnv"] == "BROKER_URL"
    assert "BROKER_URL" in [e["name"] for e in env]


@pytest.mark.parametrize("file", ["keda-redis.yaml", "keda-rabbitmq.yaml"])
def test_replica_bounds_and_cooldowns_outlast_a_running_batch(file):
    spec = scaled_object(file)["spec"]
    worker = manifests()[("Deployment", "qwen-allinone-worker")]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"]  # KEDA owns the count; `kubectl apply` must not reset it
    assert 0 <= spec["minReplicaCount"] <= 1 < spec["maxReplicaCount"] <= 32
    settings = WorkerSettings(**{k.lower(): v for k, v in worker_settings_env().items()})
    hard_limit = settings.hard_time_limit_s
    assert hard_limit == 70
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert spec["cooldownPeriod"] > hard_limit and scale_down["stabilizationWindowSeconds"] > hard_limit
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > hard_limit


def worker_settings_env() -> dict[str, str]:
    return {k: v for k, v in literal_env(container("Deployment", "qwen-allinone-worker")).items() if k not in HELPERS}


def test_the_worker_is_one_process_per_pod_with_the_images_command_and_real_settings():
    spec = container("Deployment", "qwen-allinone-worker")
    assert spec["command"] == dockerfile_cmds()["worker"]
    assert spec["command"][spec["command"].index("--concurrency") + 1] == "1"
    names = [e["name"] for e in spec["env"]]
    assert set(names) - HELPERS <= {field.upper() for field in WorkerSettings.model_fields}
    settings = WorkerSettings(**{k.lower(): v for k, v in worker_settings_env().items()})
    # A container sees every core of its node: the threads are the pod's CPU, requested and limited.
    assert settings.threads == int(spec["resources"]["limits"]["cpu"]) == int(spec["resources"]["requests"]["cpu"])
    assert settings.model.endswith(":q4_k_m")  # a GGUF: the image is built with the [llama] extra
    mounts = {m["mountPath"] for m in spec["volumeMounts"]}
    assert literal_env(spec)["HF_HOME"] in mounts


def test_the_gateway_runs_the_composed_command_with_real_settings():
    spec = container("Deployment", "qwen-allinone-gateway")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert spec["command"] == compose["services"]["api"]["command"] == dockerfile_cmds()["gateway"]
    names = {e["name"] for e in spec["env"]}
    assert names - HELPERS <= {field.upper() for field in ApiSettings.model_fields}
    port = int(spec["command"][spec["command"].index("--port") + 1])
    assert [p["containerPort"] for p in spec["ports"]] == [port]
    service = manifests()[("Service", "qwen-allinone-gateway")]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]


def test_images_are_the_dockerfiles_targets_and_services_find_their_pods():
    targets = dockerfile_cmds()
    images = {i["name"] for i in kustomization()["images"]}
    for kind, name in (("Deployment", "qwen-allinone-worker"), ("Deployment", "qwen-allinone-gateway")):
        image = container(kind, name)["image"]
        assert image in images and image.removeprefix("qwen-allinone-") in targets, image
    for (kind, name), service in manifests().items():
        if kind == "Service":
            (target,) = [o for (k, n), o in manifests().items() if k in ("Deployment", "StatefulSet") and n == name]
            labels = target["spec"]["template"]["metadata"]["labels"]
            assert service["spec"]["selector"].items() <= labels.items(), name
            assert target["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


# --- schemas: Kubernetes' own (kubernetes-validate, offline) and KEDA's CRD (@kubernetes-models/keda) ---

KUBERNETES_VERSION = "1.37.0"
KEDA_VALIDATOR = K8S / "validate"


def _all_objects() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc["kind"] != "Kustomization"]


def test_every_kubernetes_object_validates_against_kubernetes_own_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the [dev] extra: kubernetes-validate")
    core = [(name, doc) for name, doc in _all_objects() if not doc["apiVersion"].startswith("keda.sh/")]
    assert len(core) >= 6
    for name, doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises, naming the field


def _keda_validate(*files: Path) -> subprocess.CompletedProcess:
    if not (KEDA_VALIDATOR / "node_modules").is_dir():
        if os.environ.get("REQUIRE_K8S_SCHEMAS"):
            pytest.fail(f"KEDA's schemas are not installed: npm ci --prefix {KEDA_VALIDATOR.relative_to(ROOT)}")
        pytest.skip(f"KEDA's schemas: npm ci --prefix {KEDA_VALIDATOR.relative_to(ROOT)}")
    return subprocess.run(["node", "validate.mjs", *map(str, files)], cwd=KEDA_VALIDATOR, capture_output=True,
                          text=True, timeout=120)


def test_the_keda_objects_validate_against_keda_s_crd_schema():
    files = sorted(K8S.glob("keda-*.yaml"))
    result = _keda_validate(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": valid") == sum(1 for _, doc in _all_objects() if doc["apiVersion"].startswith("keda."))


def test_the_keda_validator_refuses_a_broken_scaled_object(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((K8S / "keda-redis.yaml").read_text().replace("minReplicaCount: 1", 'minReplicaCount: "one"'))
    result = _keda_validate(broken)
    assert result.returncode == 1 and "minReplicaCount must be integer" in result.stdout
