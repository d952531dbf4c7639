"""Import boundaries: the producer never pulls in torch, and neither does the worker's parent process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_the_layers_import_only_downward():
    """pyproject.toml's import-linter contracts: jobqueue depends on neither side, the producer never
    imports the worker, the engine nothing of the project outside worker/engine/."""
    import shutil

    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is not installed (pip install -e '.[dev]')"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_producer_never_imports_torch():
    result = _run(
        "import sys, producer, producer.cli, producer.client, jobqueue.store, jobqueue.protocol\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    assert result.returncode == 0, result.stderr


def test_worker_app_module_does_not_import_torch_before_fork(tiny_model_dir):
    # celery imports worker.app in the parent; torch must first start in the pool child.
    result = _run(
        "import sys, worker.app\nassert 'torch' not in sys.modules, 'torch imported in the parent'\n",
        MODEL=str(tiny_model_dir),
    )
    assert result.returncode == 0, result.stderr


def test_the_engine_boundary_imports_no_torch():
    # The worker's parent names the engine's types and dataclasses before any pool process forks.
    result = _run(
        "import sys, worker.engine, worker.engine.interface, worker.engine.chat, worker.batch\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    assert result.returncode == 0, result.stderr


def test_only_the_engine_and_the_benchmarks_import_torch():
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")) + sorted((ROOT / "producer").rglob("*.py")):
        # worker/bench measures engines (and the original pipeline); the service never imports it.
        if {"engine", "bench"} & set(path.relative_to(ROOT).parts):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import torch", "from torch", "import transformers", "from transformers")):
                offenders.append(f"{path.name}: {stripped}")
    assert offenders == []


#: What only jobqueue/queue/ may touch: kombu's transport internals and Celery's worker pool.
KOMBU_INTERNALS = ("kombu.transport", "kombu.message", "_q_for_pri", "unacked_key", "unacked_index_key",
                   "restore_unacked", "_brpop_read", "priority_steps", "_remove_from_indices", "QoS")


def test_only_the_queue_package_touches_kombu_internals():
    offenders = []
    for path in sorted(p for package in ("worker", "producer", "jobqueue") for p in (ROOT / package).rglob("*.py")):
        if path.parent == ROOT / "jobqueue" / "queue":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            offenders += [f"{path.relative_to(ROOT)}:{number}: {word}" for word in KOMBU_INTERNALS if word in line]
    assert offenders == []


def test_only_the_llama_modules_import_llama_cpp():
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")) + sorted((ROOT / "producer").rglob("*.py")):
        if path.parent.name == "engine" and path.name.startswith("llama_"):
            continue
        for line in path.read_text().splitlines():
            if line.strip().startswith(("import llama_cpp", "from llama_cpp")):
                offenders.append(f"{path.name}: {line.strip()}")
    assert offenders == []


def test_the_llama_cpp_engine_runs_without_torch_or_transformers(tiny_gguf):
    # Its process holds one model: neither torch's runtime nor transformers is loaded beside it.
    from tests.conftest import require_llama_cpp

    require_llama_cpp()
    result = _run(
        "import sys\n"
        "from worker.engine import load_engine\n"
        "from worker.engine.model_source import resolve_model_source\n"
        f"engine = load_engine(resolve_model_source({str(tiny_gguf)!r}), threads=1)\n"
        "assert engine.info().name == 'llama.cpp', engine.info()\n"
        "engine.classify('好吃')\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_worker_refuses_kombu_versions_it_was_not_tested_with(monkeypatch):
    import jobqueue.queue as queue

    assert queue.check_versions() is None  # what is installed is what was tested
    monkeypatch.setattr(queue, "version", lambda name: "5.8.1" if name == "kombu" else "5.7.0")
    problem = queue.check_versions()
    assert problem.startswith("kombu 5.8.1 installed") and "kombu 5.7.x" in problem


def test_the_engine_contract_names_every_other_part_of_the_project():
    """A module added beside worker/engine/ is forbidden to the engine too, not silently allowed."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [engine] = [c for c in contracts if c["source_modules"] == ["worker.engine"]]
    parts = {f"{package}.{path.stem}" for package in ("worker", "jobqueue") for path in (ROOT / package).iterdir()
             if (path.suffix == ".py" or (path / "__init__.py").is_file()) and path.stem != "__init__"}
    allowed = {"worker.engine", "jobqueue.labels"}
    assert parts - allowed - set(engine["forbidden_modules"]) == set()
    assert "producer" in engine["forbidden_modules"]


def test_the_engine_boundary_names_no_concrete_class():
    """interface.py describes engines with protocols and plain dataclasses only (results.py), so the
    engine's modules do not form a circle through it."""
    source = (ROOT / "worker" / "engine" / "interface.py").read_text()
    imports = [line.strip() for line in source.splitlines() if line.strip().startswith(("from worker", "import worker"))]
    assert imports == ["from worker.engine.results import EngineInfo, ReplyRequest, ReplyResult, SentimentResult"]


def test_no_function_is_over_60_lines_without_saying_why():
    """A longer function says in its docstring why it stays whole ("Longer than 60 lines: ...")."""
    import ast

    offenders = []
    for package in ("jobqueue", "producer", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 60 and "Longer than 60 lines" not in (ast.get_docstring(node) or ""):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert offenders == []
