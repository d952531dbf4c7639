"""Classifier adapters on the tiny model: training, the file, the engine's checks, and the reply left alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft", reason="training adapters needs the [tune] extra (pip install -e '.[tune]')")

from producer.evaluate import Row, balanced_sample
from jobqueue.protocol import JobStatus
from tests.conftest import require_llama_cpp, start_worker
from worker.engine.adapter import load_adapter, save_adapter
from worker.engine.model_source import ModelLoadError, resolve_model_source
from worker.tune import main as tune_main
from worker.tune import split_rows

# A toy set the tiny model can learn to separate, and recipes that do it in 40 steps.
TOY_TEXTS = ["好吃好吃", "太难吃了", "很好，喜欢", "差劲", "送得很快", "冷了，糟糕"]
TOY_GOLD = [0, 1, 0, 1, 0, 1]
TOY_RECIPES = {
    "lora": {"technique": "lora", "lora_rank": 8, "learning_rate": 0.01, "batch_size": 6, "epochs": 40},
    "deep-prefix": {"technique": "deep-prefix", "prefix_tokens": 8, "learning_rate": 0.5, "batch_size": 6,
                    "epochs": 40},
}


@pytest.fixture(scope="module", params=sorted(TOY_RECIPES))
def trained(request, tiny_model_dir, tmp_path_factory):
    """(tuner, examples, losses, accuracy before, adapter path) after training on the toy set."""
    from worker.engine.tuning import Recipe, Tuner

    recipe = Recipe(**TOY_RECIPES[request.param])
    tuner = Tuner(resolve_model_source(str(tiny_model_dir)), "zh", "fewshot", recipe, threads=1)
    examples = [tuner.example(text, gold) for text, gold in zip(TOY_TEXTS, TOY_GOLD)]
    before = tuner.accuracy(examples)
    losses = []
    tuner.train(examples, lambda step: losses.append(step.loss))
    path = tmp_path_factory.mktemp("adapter") / f"toy-{request.param}.safetensors"
    save_adapter(path, tuner.tensors(), tuner.manifest() | {"name": "toy"})
    return tuner, examples, losses, before, path


def test_training_on_a_separable_set_lowers_the_loss_and_raises_accuracy(trained):
    tuner, examples, losses, before, _ = trained
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert tuner.accuracy(examples) == 1.0 > before


def test_the_adapter_file_round_trips(trained):
    tuner, _, _, _, path = trained
    adapter = load_adapter(path)
    tensors = tuner.tensors()
    assert adapter.tensors.keys() == tensors.keys()
    assert all(np.array_equal(adapter.tensors[name], tensor) for name, tensor in tensors.items())
    recipe = adapter.manifest["recipe"]
    assert recipe == {**recipe, **TOY_RECIPES[recipe["technique"]]} and adapter.technique == recipe["technique"]
    assert adapter.manifest["labels"] == "zh" and adapter.manifest["model"]["layers"] == 2
    assert adapter.classifier == f"adapter:toy@{adapter.sha256[:8]}"
    assert path.stat().st_size < 64 * 1024  # an adapter, not a model copy


def test_the_engine_decides_as_training_did_and_names_the_classifier(trained, tiny_model_dir):
    import torch

    from worker.engine import load_engine

    tuner, examples, _, _, path = trained
    engine = load_engine(resolve_model_source(str(tiny_model_dir)), "float32", 1, engine="torch",
                         adapter=load_adapter(path))
    results = engine.classify_batch([(text, "zh") for text in TOY_TEXTS] + [("好吃", "en")])
    with torch.no_grad():
        expected = torch.softmax(tuner.classifier([e.ids for e in examples]), dim=-1).numpy()  # (rows, 2)
    got = np.array([list(r.probabilities.values()) for r in results[:-1]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r.label for r in results[:-1]] == ["正面" if g == 0 else "负面" for g in TOY_GOLD]
    assert {r.classifier for r in results[:-1]} == {load_adapter(path).classifier}
    assert results[-1].classifier == "prompt:fewshot"  # the adapter was trained for zh only
    alone = engine.classify(TOY_TEXTS[0], "zh", use_prefix_cache=False)
    assert alone.probabilities == pytest.approx(results[0].probabilities, abs=1e-5)


def test_an_adapted_sentiment_is_one_answer_per_job_under_int8(trained, tiny_model_dir):
    from worker.engine import load_engine

    engine = load_engine(resolve_model_source(str(tiny_model_dir)), "int8", 1, engine="torch",
                         adapter=load_adapter(trained[4]))
    assert engine.info().batch_invariant
    together = engine.classify_batch([(text, "zh") for text in TOY_TEXTS])
    alone = [engine.classify_batch([(text, "zh")])[0] for text in TOY_TEXTS]
    assert [r.probabilities for r in together] == [r.probabilities for r in alone]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_greedy_replies_are_identical_with_and_without_the_adapter(trained, tiny_model_dir, dtype):
    from worker.engine import ReplyRequest, load_engine

    source = resolve_model_source(str(tiny_model_dir))
    plain = load_engine(source, dtype, 1, engine="torch")
    adapted = load_engine(source, dtype, 1, engine="torch", adapter=load_adapter(trained[4]))
    requests = [ReplyRequest(text=text, max_new_tokens=12, min_new_tokens=12) for text in TOY_TEXTS]
    # One row alone, and all together: the batch shape does not matter either.
    for batch in (requests[:1], requests):
        ours = adapted.reply_batch(batch, history_max_tokens=256)
        theirs = plain.reply_batch(batch, history_max_tokens=256)
        assert [r.text for r in ours] == [r.text for r in theirs]
        assert [r.generated_tokens for r in ours] == [r.generated_tokens for r in theirs]


@pytest.mark.parametrize(("change", "named"), [
    (lambda m: m["model"].update(fingerprint="0" * 16), "model.fingerprint"),
    (lambda m: m["model"].update(layers=24), "model.layers"),
    (lambda m: m.update(tokenizer_sha256="f" * 16), "tokenizer_sha256"),
    (lambda m: m.update(label_words=["好", "坏"]), "label_words"),
    (lambda m: m.update(classifier_prompt="另一个提示"), "classifier_prompt"),
])
def test_an_adapter_trained_for_something_else_is_refused_naming_the_mismatch(
        trained, tiny_model_dir, tmp_path, change, named):
    from worker.engine import load_engine

    adapter = load_adapter(trained[4])
    manifest = json.loads(json.dumps(adapter.manifest))
    change(manifest)
    path = tmp_path / "other.safetensors"
    save_adapter(path, adapter.tensors, manifest)
    with pytest.raises(ModelLoadError, match=rf"^CLASSIFIER_ADAPTER='{path}' does not fit: {named}"):
        load_engine(resolve_model_source(str(tiny_model_dir)), "float32", 1, engine="torch",
                    adapter=load_adapter(path))


def test_a_file_that_is_not_an_adapter_is_refused(tmp_path):
    path = tmp_path / "not.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelLoadError, match=r"^CLASSIFIER_ADAPTER=.* is not a classifier adapter file"):
        load_adapter(path)
    with pytest.raises(ModelLoadError, match=r"^CLASSIFIER_ADAPTER=.*: no such file"):
        load_adapter(tmp_path / "missing.safetensors")


def test_the_llama_cpp_engine_refuses_an_adapter_with_one_line(trained, tiny_gguf):
    require_llama_cpp()
    from worker.runtime import WorkerRuntime
    from worker.settings import WorkerSettings

    runtime = WorkerRuntime(WorkerSettings(model=str(tiny_gguf), engine="auto", classifier_adapter=str(trained[4])))
    with pytest.raises(ModelLoadError, match=r"^CLASSIFIER_ADAPTER needs ENGINE=torch"):
        runtime.resolve_model()


def test_the_split_leaves_out_the_dev_sample_and_is_the_same_every_time():
    rows = [Row(f"评论{i}", i % 2) for i in range(200)] + [Row("评论0", 0)]  # a duplicate of a dev text
    first = split_rows(rows, dev_size=40, heldout=20, limit=60, seed=3)
    again = split_rows(rows, dev_size=40, heldout=20, limit=60, seed=3)
    dev = {row.text for row in balanced_sample(rows, 40, 0)}
    assert first == again
    assert not dev & {row.text for row in first.train + first.heldout}
    assert len(first.train) == 60 and len(first.heldout) == 20
    assert not {id(r) for r in first.train} & {id(r) for r in first.heldout}


def test_the_tune_command_writes_an_adapter_that_records_its_training(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "toy.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("label", "review")] + [(1 - g, f"{t}{i}") for i in range(10)
                                                         for t, g in zip(TOY_TEXTS, TOY_GOLD)])
    out = tmp_path / "cmd.safetensors"
    code = tune_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--limit", "24",
                      "--heldout", "8", "--dev-size", "10", "--threads", "1", "--batch-size", "8",
                      "--technique", "lora"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "24 training rows, 8 held out" in printed and "held-out accuracy" in printed
    manifest = load_adapter(out).manifest
    assert manifest["data"]["train_rows"] == 24 and manifest["data"]["files"][0]["sha256"] and manifest["name"] == "cmd"
    assert manifest["recipe"]["technique"] == "lora" and manifest["recipe"]["seed"] == 0


@pytest.mark.slow
def test_records_name_the_classifier_and_a_mismatched_adapter_stops_the_worker(
        trained, worker_env, make_client, tmp_path):
    adapter = load_adapter(trained[4])
    worker = start_worker("worker.app", tmp_path / "adapted.log",
                          {**worker_env, "CLASSIFIER_ADAPTER": str(trained[4]), "DTYPE": "float32"}, name="adapted")
    try:
        client = make_client()
        records = [client.wait(client.submit(text, labels=labels, max_new_tokens=4), timeout=60)
                   for text, labels in ((TOY_TEXTS[0], "zh"), (TOY_TEXTS[0], "en"))]
    finally:
        worker.stop()
    assert [r.status for r in records] == [JobStatus.SUCCEEDED] * 2
    assert [r.sentiment.classifier for r in records] == [adapter.classifier, "prompt:fewshot"]

    manifest = json.loads(json.dumps(adapter.manifest))
    manifest["tokenizer_sha256"] = "f" * 16
    bad = tmp_path / "bad.safetensors"
    save_adapter(bad, adapter.tensors, manifest)
    log = _log_of_a_worker_refusing(worker_env, tmp_path, bad)
    assert f"qwen-allinone worker: cannot start: CLASSIFIER_ADAPTER='{bad}' does not fit: tokenizer_sha256" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_missing_adapter_stops_the_worker_before_the_pool_starts(worker_env, tmp_path):
    missing = Path(tmp_path / "nowhere.safetensors")
    log = _log_of_a_worker_refusing(worker_env, tmp_path, missing)
    assert f"cannot start: CLASSIFIER_ADAPTER='{missing}': no such file" in log


def _log_of_a_worker_refusing(worker_env: dict[str, str], tmp_path: Path, adapter: Path) -> str:
    """Start a worker with CLASSIFIER_ADAPTER=adapter, check that it exits non-zero, return its log."""
    worker = start_worker("worker.app", tmp_path / f"{adapter.stem}.log",
                          {**worker_env, "CLASSIFIER_ADAPTER": str(adapter)}, wait_loaded=False, name="refused")
    try:
        assert worker.process.wait(60) != 0
    finally:
        worker.stop()
    return worker.log()
