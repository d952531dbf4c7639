"""The prompt-layout bench (EVAL.md) scores what the service decides, through the real loading code."""

import pytest

from producer.evaluate import Row
from worker.bench.prompts import WORD_PAIRS, layouts, measure_prompts, p_positive
from worker.engine.qwen import QwenEngine
from worker.bench.wordscores import WordScorer
from worker.engine.model_source import resolve_model_source
from worker.engine.prompts import DEFAULT_CLASSIFIER_PROMPT

TEXTS = ["送得很快，味道也好", "太难吃了，再也不点", "还行吧"]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir) -> WordScorer:
    words = [word for _, *pair in WORD_PAIRS for word in pair]
    return WordScorer.load(resolve_model_source(str(tiny_model_dir)), words, "float32", threads=1)


def test_the_default_layout_gives_the_services_own_probability(scorer, tiny_model_dir):
    engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)
    build = layouts()[f"system:{DEFAULT_CLASSIFIER_PROMPT}"]
    for text in TEXTS:
        served = engine.classify(text, "zh", use_prefix_cache=False).probabilities["正面"]
        assert p_positive(scorer.scores(build(text)), "正面", "负面") == pytest.approx(served, abs=1e-5)


def test_every_layout_and_word_pair_gets_a_row(scorer):
    examples = [Row(text, gold) for text, gold in zip(TEXTS, (0, 1, 0))]
    rows = measure_prompts(scorer, examples)
    assert [(row.layout, row.words) for row in rows] == [
        (layout, pair[0]) for layout in layouts() for pair in WORD_PAIRS]
    for row in rows:
        # Three rows: every accuracy is a whole number of thirds, the best never below the 0.5 one.
        assert round(row.accuracy * 3, 9) in (0, 1, 2, 3)
        assert row.accuracy <= row.best_accuracy <= 1
        assert 0.05 <= row.best_threshold <= 0.95


def test_an_unknown_layout_is_named(scorer):
    with pytest.raises(ValueError, match="unknown layouts \\['nope'\\]"):
        measure_prompts(scorer, [Row("好", 0)], ["nope"])
