"""The readout classifier: trained across domains on states computed once, served alike by both engines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from producer.evaluate import Row
from tests.conftest import require_llama_cpp
from worker.engine.adapter import load_adapter, save_adapter
from worker.engine.model_source import ModelLoadError, resolve_model_source
from worker.readout import accuracy, choose_c, fit, leave_one_domain_out
from worker.tune import main as tune_main
from worker.tune_readout import compute_states, sample_domains

pytest.importorskip("sklearn", reason="the readout's fitting needs the [tune] extra (scikit-learn)")

# Three domains of toy reviews; the words carry the sentiment, the domain only adds its own noun.
GOOD = ["好吃", "很好", "喜欢", "满意", "推荐", "不错"]
BAD = ["难吃", "太差", "失望", "糟糕", "退货", "垃圾"]
DOMAINS = {"外卖": "这家饭", "水果": "这箱苹果", "衣服": "这件衣服"}


def _write_toy_csv(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["cat", "label", "review"])
        for cat, noun in DOMAINS.items():
            for i in range(12):
                writer.writerow([cat, 1, f"{noun}{GOOD[i % 6]}{'，' * (i // 6)}"])
                writer.writerow([cat, 0, f"{noun}{BAD[i % 6]}{'，' * (i // 6)}"])
    return path


def _separable(n: int = 400, hidden: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    golds = rng.integers(0, 2, n)
    states = rng.normal(size=(n, hidden)) * 3.0 + 100.0   # far from zero and unscaled, as real states are
    states[:, 0] = 100.0 + np.where(golds == 0, 1.5, -1.5) + rng.normal(size=n) * 0.5
    domains = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, n)]
    return states.astype(np.float32), golds, domains


def test_a_fitted_readout_separates_what_is_separable_and_folds_its_scaling_in():
    states, golds, domains = _separable()
    readout = fit(states, golds, c=1.0)
    assert readout.weight.shape == (2, 16) and readout.bias.shape == (2,)
    assert accuracy(readout, states, golds) > 0.9
    assert np.all(readout.weight[0] == 0)  # binary: label 0 (positive) is the reference row
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(states, golds)
    assert np.array_equal(readout.predict(states), reference.predict(states))  # the scaling is folded in exactly
    folds = leave_one_domain_out(states, golds, domains, c=1.0)
    assert set(folds) == {"a", "b", "c", "d"} and min(folds.values()) > 0.85
    best, every = choose_c(states, golds, domains, grid=(0.001, 1.0))
    assert best in every and set(every) == {0.001, 1.0}


def test_domains_are_sampled_balanced_with_the_held_out_split_and_left_out_domain_apart():
    rows = [Row(f"{d}{g}{i}", g, d) for d in "xyz" for g in (0, 1) for i in range(30)]
    train, kept = sample_domains({Path("f.csv"): rows}, per_domain=20, heldout=10, dev_size=0,
                                 leave_out=["z"], seed=1)
    for domain in "xy":
        assert sum(r.domain == domain and r.gold == 0 for r in train) == 10
        assert sum(r.domain == domain and r.gold == 1 for r in kept) == 5
    assert not any(r.domain == "z" for r in train + kept)
    assert not {r.text for r in train} & {r.text for r in kept}


def test_a_killed_run_resumes_its_states_from_the_checkpoint(tmp_path, monkeypatch):
    import worker.tune_readout as tune_readout

    monkeypatch.setattr(tune_readout, "CHUNK", 2)
    monkeypatch.setattr(tune_readout, "SAVE_EVERY", 2)
    calls = []

    class FakeEngine:
        def __init__(self, fail_after=None):
            self.fail_after = fail_after

        def classifier_states(self, texts, labels):
            calls.append(list(texts))
            if self.fail_after is not None and len(calls) > self.fail_after:
                raise KeyboardInterrupt  # the run is killed here
            values = np.array([[len(t), ord(t[-1])] for t in texts], dtype=np.float32)
            return values, values[:, :1]

    texts = [f"text{i}" for i in range(9)]
    checkpoint = tmp_path / "run.states.npz"
    with pytest.raises(KeyboardInterrupt):
        compute_states(FakeEngine(fail_after=3), texts, "zh", checkpoint, key="k")
    calls.clear()
    states, scores = compute_states(FakeEngine(), texts, "zh", checkpoint, key="k")
    assert calls[0] == ["text6", "text7"]  # the first six were saved: not read again
    expected, _ = compute_states(FakeEngine(), texts, "zh", tmp_path / "fresh.npz", key="k")
    assert np.array_equal(states, expected) and scores.shape == (9, 1)
    calls.clear()
    compute_states(FakeEngine(), texts, "zh", checkpoint, key="other run")
    assert calls[0] == ["text0", "text1"]  # another run's checkpoint is not used


@pytest.fixture(scope="module")
def readout_file(tiny_model_dir, tmp_path_factory) -> Path:
    """A readout trained by the command on the tiny model's folder (states on torch)."""
    folder = tmp_path_factory.mktemp("readout")
    data = _write_toy_csv(folder / "toy.csv")
    out = folder / "toy-readout.safetensors"
    code = tune_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--per-domain", "16",
                      "--heldout", "8", "--dev-size", "0", "--threads", "1", "--dtype", "float32"])
    assert code == 0
    return out


def test_the_command_reports_every_domain_and_writes_a_readout(readout_file, capsys):
    adapter = load_adapter(readout_file)
    manifest = adapter.manifest
    assert adapter.technique == "readout" and not adapter.changes_the_pass
    assert set(manifest["domains"]) == set(DOMAINS)
    assert all(row["heldout_rows"] == 8 and row["leave_one_out"] is not None for row in manifest["domains"].values())
    assert manifest["data"]["train_rows"] == 16 * len(DOMAINS) and manifest["recipe"]["c"] > 0


def _engines(tiny_model_dir, tiny_gguf, adapter_path):
    from worker.engine import load_engine

    require_llama_cpp()
    adapter = load_adapter(adapter_path)
    return [load_engine(resolve_model_source(str(model)), "float32", 1, engine=engine, adapter=adapter)
            for model, engine in ((tiny_model_dir, "torch"), (tiny_gguf, "llama.cpp"))]


def test_an_adapter_trained_on_the_folder_serves_the_gguf_file_with_the_same_labels(
        readout_file, tiny_model_dir, tiny_gguf):
    torch_engine, llama_engine = _engines(tiny_model_dir, tiny_gguf, readout_file)
    texts = [f"{noun}{word}{i}" for noun in DOMAINS.values() for word in GOOD + BAD for i in range(3)]
    on_torch = torch_engine.classify_batch([(t, "zh") for t in texts])
    on_llama = llama_engine.classify_batch([(t, "zh") for t in texts])
    assert all(r.classifier.startswith("adapter:toy-readout@") for r in on_torch + on_llama)
    agree = np.mean([a.label == b.label for a, b in zip(on_torch, on_llama)])
    assert agree >= 0.99
    for a, b in zip(on_torch, on_llama):
        assert a.probabilities["正面"] == pytest.approx(b.probabilities["正面"], abs=0.05)


def test_the_reply_never_sees_the_readout(readout_file, tiny_model_dir, tiny_gguf):
    from worker.engine import ReplyRequest, load_engine

    for engine, model in zip(_engines(tiny_model_dir, tiny_gguf, readout_file), (tiny_model_dir, tiny_gguf)):
        plain = load_engine(resolve_model_source(str(model)), "float32", 1, engine=engine.info().name)
        request = [ReplyRequest("这家饭好吃", max_new_tokens=12, mood="positive")]
        assert engine.reply_batch(request, history_max_tokens=64) == plain.reply_batch(request, history_max_tokens=64)


@pytest.mark.parametrize("change, named", [
    (lambda m: m.update(classifier_prompt="另一个提示"), "classifier_prompt"),
    (lambda m: m.update(tokenizer_fingerprint="0" * 16), "tokenizer_fingerprint"),
    (lambda m: m["model"].update(hidden=128), "model.hidden"),
    (lambda m: m.update(label_words=["好", "坏"]), "label_words"),
])
def test_an_adapter_made_for_something_else_stops_both_engines_with_one_line(
        readout_file, tiny_model_dir, tiny_gguf, tmp_path, change, named):
    adapter = load_adapter(readout_file)
    manifest = json.loads(json.dumps(adapter.manifest))
    change(manifest)
    path = tmp_path / "other.safetensors"
    save_adapter(path, adapter.tensors, manifest)
    for model, engine in ((tiny_model_dir, "torch"), (tiny_gguf, "llama.cpp")):
        with pytest.raises(ModelLoadError, match=rf"^CLASSIFIER_ADAPTER='{path}' does not fit: {named}"):
            from worker.engine import load_engine

            require_llama_cpp()
            load_engine(resolve_model_source(str(model)), "float32", 1, engine=engine, adapter=load_adapter(path))


def test_llama_cpp_reads_the_final_hidden_states_back_from_the_logits(tiny_model_dir, tiny_gguf):
    """No embeddings mode (it would make every prompt token an output): h = (W^T W)^-1 W^T logits."""
    from worker.engine import load_engine

    require_llama_cpp()
    texts = ["送餐太慢了", "很好吃，推荐！", "The staff were rude."]
    states = [load_engine(resolve_model_source(str(model)), "float32", 1, engine=engine).classifier_states(texts, "zh")[0]
              for model, engine in ((tiny_model_dir, "torch"), (tiny_gguf, "llama.cpp"))]
    assert states[0].shape == states[1].shape == (3, 64)
    assert np.abs(states[0] - states[1]).max() < 0.02 * np.abs(states[0]).max()
