"""The engine, loaded from the tiny test model through the production loading code."""

from __future__ import annotations

import time

import pytest
import torch

from jobqueue.protocol import LABEL_SETS
from worker.engine import StopReason
from worker.engine.qwen import QwenEngine
from worker.engine.model_source import ModelLoadError, resolve_model_source


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> QwenEngine:
    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)


def reply(engine, text="送餐太慢了", history=(), **overrides):
    kwargs = {"max_new_tokens": 16, "temperature": 0.0, "deadline": time.time() + 30, "history_max_tokens": 1024}
    kwargs.update(overrides)
    return engine.reply(text, list(history), **kwargs)


@pytest.mark.parametrize("label_set", ["zh", "en"])
def test_classify_always_answers_a_label_with_a_probability(engine, label_set):
    for text in ["很快，好吃，味道足，量大", "Terrible service", "😄😄😄", "<script>alert(1)</script>"]:
        result = engine.classify(text, label_set)
        assert result.label in LABEL_SETS[label_set]
        assert 0.0 <= result.confidence <= 1.0
        # The model's probability of the label it gave (with POSITIVE_THRESHOLD, not always the largest).
        assert result.confidence == result.probabilities[result.label]
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.prompt_tokens > 0


def test_reply_stops_at_max_new_tokens(engine):
    result = reply(engine, max_new_tokens=5)
    assert 1 <= result.generated_tokens <= 5
    # A reply the limit cut short is truncated, and ends at its last sentence boundary.
    assert result.truncated is (result.stop_reason is StopReason.LENGTH)
    assert isinstance(result.text, str)


def test_reply_past_deadline_is_empty_and_truncated(engine):
    result = reply(engine, deadline=time.time() - 1)
    assert result.truncated and result.text == "" and result.generated_tokens == 0


def test_reply_cut_by_the_deadline_is_truncated(engine):
    handle = engine.model.decoder.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        started = time.time()
        result = reply(engine, max_new_tokens=200, deadline=started + 0.3)
    finally:
        handle.remove()
    assert result.truncated
    assert result.generated_tokens < 200
    assert time.time() - started < 1.0


def test_history_is_used_and_bounded_by_the_token_budget(engine):
    turns = [(f"问题 {i}", f"回答 {i}") for i in range(10)]
    without = reply(engine, history=[])
    with_history = reply(engine, history=turns[-2:])
    assert with_history.history_turns_used == 2
    assert with_history.prompt_tokens > without.prompt_tokens
    budget = 40
    kept = engine.fit_history(turns, budget)
    assert 0 < len(kept) < len(turns)
    assert kept == turns[-len(kept):]  # newest kept, oldest dropped
    assert engine.fit_history(turns, 0) == []


def test_bfloat16_loads_and_classifies(tiny_model_dir):
    import torch

    engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "bfloat16", threads=1)
    assert engine.model.decoder.layers[0].qkv.weight.dtype == torch.bfloat16
    assert engine.classify("好吃").label in LABEL_SETS["zh"]


def test_bad_model_sources_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    cases = [str(tmp_path / "missing"), str(tmp_path / "weights.bin"), str(tmp_path / "empty"),
             "Qwen/No-Such-Model-Here", str(tmp_path / "model.gguf")]
    for model in cases:
        with pytest.raises(ModelLoadError, match=r"^MODEL="):
            resolve_model_source(model)


def test_corrupt_model_folder_is_a_clear_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"^MODEL=.* could not be loaded"):
        QwenEngine.load(resolve_model_source(str(tmp_path)))


def test_gguf_file_loads_and_scores_like_the_folder(engine, tiny_model_dir, tmp_path):
    from tests.support.tiny_model import write_tiny_gguf

    path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    source = resolve_model_source(str(path))
    assert source.gguf_file == "tiny.gguf"
    from_gguf = QwenEngine.load(source, "float32", threads=1)
    messages = [{"role": "user", "content": "好吃 hello <|im_end|>"}]
    assert from_gguf.encode_chat(messages) == engine.encode_chat(messages)
    expected = engine.classify("好吃").probabilities
    for label, probability in from_gguf.classify("好吃").probabilities.items():
        assert probability == pytest.approx(expected[label], abs=1e-4)


def _cache_snapshot(prefix):
    cache = prefix.sequences.cache
    return [t.clone() for t in cache.keys + cache.values], list(cache.lengths)


# The cached path runs the prefix and the text in two passes instead of one: the
# same arithmetic, grouped differently, so the scores agree to rounding.
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 2e-2), ("int8", 5e-3)])
def test_prefix_cache_scores_like_the_uncached_path(tiny_model_dir, dtype, tolerance):
    engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), dtype, threads=1)
    for text in ["很快，好吃，味道足，量大", "Terrible service", "😄"]:
        for label_set in LABEL_SETS:
            cached = engine.classify(text, label_set).probabilities
            uncached = engine.classify(text, label_set, use_prefix_cache=False).probabilities
            for label, probability in cached.items():
                assert probability == pytest.approx(uncached[label], abs=tolerance)


def test_prefix_caches_survive_1000_jobs_unchanged(engine):
    prefixes = [*engine.classifier_prefixes.values(), *engine.reply_prefixes.values()]
    before = [_cache_snapshot(prefix) for prefix in prefixes]
    for i in range(1000):
        engine.classify(f"第{i}条评论 好吃", "zh" if i % 2 else "en")
    for i in range(5):
        reply(engine, text=f"第{i}条 太慢了", history=[("你好", "您好")])
    for prefix, (tensors, lengths) in zip(prefixes, before):
        after, after_lengths = _cache_snapshot(prefix)
        assert after_lengths == lengths == [len(prefix.ids)]
        assert all(torch.equal(a, b) for a, b in zip(tensors, after))


def test_the_prefix_is_the_fixed_start_of_every_prompt(engine):
    prefix = engine.classifier_prefixes["zh"]
    from worker.engine.prompts import classifier_prompt

    for text in ["a", "很长的评论" * 20, "<|im_start|>"]:
        ids = engine.encode_chat([{"role": "system", "content": classifier_prompt("zh")},
                                  {"role": "user", "content": text}])
        assert tuple(ids[: len(prefix.ids)]) == prefix.ids and len(ids) > len(prefix.ids)


def test_int8_holds_int8_weights_once_and_keeps_label_rows_exact(tiny_model_dir):
    from worker.engine.weights import FloatLinear, Int8Linear

    source = resolve_model_source(str(tiny_model_dir))
    full = QwenEngine.load(source, "float32", threads=1)
    quantized = QwenEngine.load(source, "int8", threads=1)
    decoder = quantized.model.decoder
    linears = [m for m in decoder.modules() if isinstance(m, (Int8Linear, FloatLinear))]
    assert linears and all(isinstance(m, Int8Linear) and m.weight.dtype == torch.int8 for m in linears)
    # Tied embeddings: the input table and the output layer are one int8 tensor.
    assert decoder.output is decoder.embedding
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in decoder.buffers())
    for token_id, row in full.model.label_rows.items():
        assert torch.equal(row, quantized.model.label_rows[token_id])
    assert quantized.classify("好吃").label in LABEL_SETS["zh"]
    assert quantized.info().weight_bytes < full.info().weight_bytes / 3


def test_min_new_tokens_fixes_the_reply_length(engine):
    result = reply(engine, max_new_tokens=12, min_new_tokens=12)
    assert result.generated_tokens == 12 and result.stop_reason is StopReason.LENGTH and result.truncated


def test_label_set_whose_words_share_a_first_token_is_unavailable_not_fatal(tiny_model_dir, monkeypatch):
    from worker.engine import prompts
    from worker.engine import chat

    monkeypatch.setitem(chat.LABEL_SETS, "clash", ("正面", "正面啊"))
    monkeypatch.setitem(prompts.CLASSIFIER_PROMPTS[prompts.DEFAULT_CLASSIFIER_PROMPT], "clash", "只回答“{positive}”或“{negative}”。")
    engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)
    assert "clash" in engine.unavailable_label_sets
    with pytest.raises(ValueError, match="labels='clash' is not available with MODEL="):
        engine.classify("好吃", "clash")
    assert engine.classify("好吃", "zh3").label in LABEL_SETS["zh3"]


def test_three_class_sets_answer_one_of_three(engine):
    for label_set in ("zh3", "en3"):
        result = engine.classify("还行吧，一般般", label_set)
        assert result.label in LABEL_SETS[label_set] and len(result.probabilities) == 3


def test_positive_threshold_moves_the_decision(tiny_model_dir):
    source = resolve_model_source(str(tiny_model_dir))
    strict = QwenEngine.load(source, "float32", threads=1, positive_threshold=0.999)
    lenient = QwenEngine.load(source, "float32", threads=1, positive_threshold=0.001)
    assert strict.classify("好吃").label == "负面" and lenient.classify("好吃").label == "正面"
    # The confidence stays the probability of the label given.
    assert lenient.classify("好吃").confidence == lenient.classify("好吃").probabilities["正面"]


def test_unknown_prompt_variant_names_the_setting(tiny_model_dir):
    from worker.engine.model_source import ModelLoadError

    with pytest.raises(ModelLoadError, match="CLASSIFIER_PROMPT='nope'"):
        QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1, prompt_variant="nope")


def test_the_lean_decoder_computes_what_transformers_computes(tiny_model_dir):
    # The decoder replaces transformers' forward in the serving path: same logits, chunked or not.
    from transformers import AutoModelForCausalLM

    from worker.engine.decoder import Qwen2Decoder

    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = [5, 17, 33, 100, 200, 7, 9, 11]
    with torch.inference_mode():
        reference = reference_model(torch.tensor([ids])).logits[0]  # (8, vocabulary)
        decoder = Qwen2Decoder(reference_model, "float32")
        cache = decoder.new_cache(rows=2, capacity=16)
        first = decoder(cache, [(0, ids[:5])])                        # a prefill
        second = decoder(cache, [(0, ids[5:6]), (1, ids[:3])])        # a step beside another row's prefill
        third = decoder(cache, [(0, ids[6:])])                        # a chunk after that
        logits = decoder.logits(torch.cat([first, second, third]))
    for got, want in zip(logits, [reference[4], reference[5], reference[2], reference[7]]):
        assert torch.allclose(got, want, atol=1e-5)
    assert cache.lengths == [8, 3]


def test_a_segment_past_the_cache_capacity_is_refused(engine):
    sequences = engine.model.new_sequences(1, 4)
    with pytest.raises(ValueError, match="its cache holds 4"):
        sequences.extend([(0, [1, 2, 3, 4, 5])])


def test_an_untied_models_embedding_is_read_through_a_memory_map(tmp_path):
    # Only the rows looked up become resident; the output layer keeps its own table.
    from transformers import AutoModelForCausalLM

    from worker.bench.shapes import build_random_qwen
    from worker.engine.mapped import MappedEmbedding

    folder = build_random_qwen("tiny", tmp_path / "untied", tie_word_embeddings=False)
    engine = QwenEngine.load(resolve_model_source(str(folder)), "int8", threads=1)
    decoder = engine.model.decoder
    assert isinstance(decoder.embedding, MappedEmbedding) and decoder.output is not decoder.embedding
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).model.embed_tokens.weight
    ids = torch.tensor([0, 5, 17, len(reference) - 1])
    assert torch.equal(decoder.embedding.embed(ids), reference[ids].detach())
    assert engine.classify("好吃").label in LABEL_SETS["zh"]
    assert reply(engine, max_new_tokens=4, min_new_tokens=4).generated_tokens == 4
    # In memory there is one vocabulary-sized table, the output layer's.
    tables = [b for b in decoder.buffers() if tuple(b.shape) == tuple(reference.shape)]
    assert len(tables) == 1 and tables[0] is decoder.output.output.weight
