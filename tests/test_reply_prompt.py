"""The reply reads the sentiment just decided, and a reply cut by its limit ends at a sentence boundary."""

from __future__ import annotations

import pytest

from jobqueue.protocol import LABEL_SETS
from worker.engine import ReplyRequest
from worker.engine.chat import ChatFormat
from worker.engine.qwen import QwenEngine
from worker.engine.model_source import resolve_model_source
from worker.engine.prompts import (
    MOOD_CONFIDENCE,
    MOODS,
    REPLY_LANGUAGES,
    reply_language,
    reply_mood,
    reply_prefix_messages,
)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> QwenEngine:
    return QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)


@pytest.mark.parametrize("text, expected", [
    ("您好！很抱歉让您久等了。我们会尽快", "您好！很抱歉让您久等了。"),
    ("Sorry about that. We will refund the ord", "Sorry about that."),
    ("价格是3.5元，送餐很快", "价格是3.5元，送餐很快"),             # no boundary: kept whole (no word to drop)
    ("We are so sorry that your order was la", "We are so sorry that your order was"),  # no sentence: whole words
    ("他说：“谢谢你。”然后就", "他说：“谢谢你。”"),                  # the closing quote stays with its sentence
    ("1. 写明请假原因\n2. 写明请", "1. 写明请假原因"),
])
def test_a_cut_reply_ends_at_its_last_sentence_boundary(text, expected):
    assert ChatFormat.end_at_sentence(text) == expected


def test_the_mood_is_the_sentiment_only_when_the_classifier_is_sure():
    assert reply_mood("zh", "负面", 0.9) == "negative"
    assert reply_mood("en", "positive", MOOD_CONFIDENCE) == "positive"
    assert reply_mood("zh3", "中性", 0.99) == "neutral"
    assert reply_mood("zh", "负面", MOOD_CONFIDENCE - 0.01) == "neutral"  # unsure: no mood is claimed
    assert reply_mood("zh", None, None) == "neutral"


def test_each_mood_and_language_has_a_cached_prefix_and_its_own_instructions(engine):
    for lang, text in (("zh", "送餐太慢了"), ("en", "The delivery was slow")):
        assert reply_language(text) == lang
        for mood in MOODS:
            prompt = engine.reply_prompt(text, [], mood)
            prefix = engine.reply_prefix_for(text, mood)
            assert prefix is engine.reply_prefixes[mood, lang]
            assert tuple(prompt[: len(prefix.ids)]) == prefix.ids
            system = reply_prefix_messages(mood, lang)[0]["content"]
            assert system in engine.text_of(prompt)
    # The default variant tells the model the mood, in the text's language, and shows it examples.
    assert len({id(prefix) for prefix in engine.reply_prefixes.values()}) == len(MOODS) * len(REPLY_LANGUAGES)
    assert len(reply_prefix_messages("negative", "en")) > 1


def test_a_variant_whose_moods_share_a_prompt_shares_one_prefix(tiny_model_dir):
    original = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1,
                               reply_variant="original")
    assert len({id(prefix) for prefix in original.reply_prefixes.values()}) == 1
    assert all(len(reply_prefix_messages(m, lang, "original")) == 1 for m in MOODS for lang in REPLY_LANGUAGES)


@pytest.mark.parametrize("text, lang", [("送餐太慢了", "zh"), ("Great!", "en"), ("iPhone 电池不耐用", "zh"),
                                        ("", "en"), ("OK, fine 好", "en")])
def test_the_reply_language_follows_the_text(text, lang):
    assert reply_language(text) == lang


def test_a_reply_in_a_mood_is_what_that_prompt_gives_alone(engine):
    """The session copies the mood's own prefix: a batch of mixed moods equals each reply alone."""
    requests = [ReplyRequest("送餐太慢了", max_new_tokens=8, mood=mood) for mood in MOODS]
    together = engine.reply_batch(requests, history_max_tokens=64)
    for request, result in zip(requests, together):
        alone = engine.reply_batch([request], history_max_tokens=64)[0]
        assert (alone.text, alone.prompt_tokens) == (result.text, result.prompt_tokens)
    assert len({r.prompt_tokens for r in together}) == len(MOODS)  # three prompts of their own


def test_every_label_word_maps_to_a_mood():
    for label_set, words in LABEL_SETS.items():
        assert {reply_mood(label_set, word, 1.0) for word in words} <= set(MOODS)


def test_every_prefix_is_built_at_load_and_prompts_that_are_the_same_share_one(tiny_model_dir):
    """Built at load, so no job waits for a prefix's prefill; identical prompts hold one cache."""
    engine = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1)
    assert len(engine.reply_prefixes.built()) == len(MOODS) * len(REPLY_LANGUAGES)
    assert len(engine.classifier_prefixes.built()) == len(LABEL_SETS)
    assert engine.reply_prefixes.longest() == max(p.cache_tokens for p in engine.reply_prefixes.built())
    original = QwenEngine.load(resolve_model_source(str(tiny_model_dir)), "float32", threads=1,
                               reply_variant="original")
    assert len(original.reply_prefixes.built()) == 1
