"""The NumPy sampler both engines share: greedy, temperature, top-k/top-p and the repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from worker.engine.generation import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_REPETITION_WINDOW,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    DecodeRow,
    ReplyControls,
    Sampler,
    _draw,
    _penalize_repeats,
)

STOP = 3


def row(temperature: float = 0.0, min_new_tokens: int = 0, prompt=(5, 6)) -> DecodeRow:
    return DecodeRow(max_new_tokens=10, min_new_tokens=min_new_tokens, temperature=temperature,
                     deadline=float("inf"), prompt_ids=list(prompt))


def test_greedy_takes_the_largest_and_min_new_tokens_hides_the_stop_token():
    logits = np.array([[0.0, 1.0, 2.0, 9.0, 0.5]], dtype=np.float32)
    sampler = Sampler((STOP,))
    assert sampler.choose(logits, [row()]) == [STOP]
    assert sampler.choose(logits, [row(min_new_tokens=1)]) == [2]
    assert logits[0, STOP] == 9.0  # the caller's logits are left as they were


def test_draws_follow_the_distribution_and_never_pick_a_word_of_zero_weight():
    weights = np.zeros(5000, dtype=np.float32)
    weights[[0, 1500, 2047, 4999]] = [0.1, 0.2, 0.3, 0.4]
    rng = np.random.default_rng(0)
    picks = np.bincount([_draw(weights, rng.random()) for _ in range(20_000)], minlength=len(weights))
    assert picks.sum() == picks[[0, 1500, 2047, 4999]].sum()
    assert picks[[0, 1500, 2047, 4999]] / 20_000 == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)
    assert _draw(weights, 0.0) == 0 and _draw(weights, 1.0) == 4999  # the ends of [0, 1]


def test_top_k_and_top_p_keep_the_words_transformers_keeps():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(1, 400)).astype(np.float32)
    for top_k, top_p in [(20, None), (None, 0.8), (50, 0.9)]:
        expected = torch.from_numpy(scores.copy())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p:
            expected = TopPLogitsWarper(top_p)(None, expected)
        allowed = set(np.flatnonzero(np.isfinite(expected.numpy()[0])))
        sampler = Sampler((STOP,), top_k=top_k, top_p=top_p, rng=np.random.default_rng(2))
        picks = {sampler.choose(scores, [row(temperature=1.0)])[0] for _ in range(300)}
        assert picks <= allowed and len(picks) > 1


def _draw_over_the_whole_vocabulary(sampler: Sampler, scores: np.ndarray, temperature: float, u: float) -> int:
    """The sampler as it was before it worked on the top k alone: masks and exponentials over every word."""
    scores = scores / temperature
    if sampler.top_k is not None:
        kth = np.partition(scores, -sampler.top_k)[-sampler.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    weights = np.exp(scores - scores.max())
    if sampler.top_p is not None:
        candidates = np.flatnonzero(weights)
        probabilities = weights[candidates] / weights[candidates].sum()
        order = np.argsort(probabilities, kind="stable")
        tail = np.cumsum(probabilities[order]) <= 1 - sampler.top_p
        tail[-1] = False
        weights[candidates[order[tail]]] = 0.0
    return _draw(weights, u)


@pytest.mark.parametrize("top_k, top_p", [(20, 0.8), (50, None), (None, 0.9)])
def test_drawing_among_the_top_k_picks_what_a_draw_over_every_word_picks(top_k, top_p):
    rng = np.random.default_rng(3)
    sampler = Sampler((STOP,), top_k=top_k, top_p=top_p, rng=np.random.default_rng(4))
    same = np.random.default_rng(4)  # the same uniforms, drawn by the reference
    for _ in range(300):
        scores = (rng.normal(size=30_000) * 3).astype(np.float32)
        assert sampler._sample(scores, 0.7) == _draw_over_the_whole_vocabulary(sampler, scores, 0.7, same.random())


def test_the_repetition_penalty_is_transformers_own():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50).astype(np.float32)
    seen = [1, 4, 4, 7, 49]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.from_numpy(scores.copy()[None]))
    _penalize_repeats(scores, seen, 1.3)
    assert np.array_equal(scores, expected.numpy()[0])


def test_settings_come_from_a_generation_config_object_or_its_json():
    class Config:
        top_k, top_p, repetition_penalty = 20, 0.8, 1.05

    from_object = Sampler.from_generation_config(Config(), [STOP])
    from_json = Sampler.from_generation_config({"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}, [STOP])
    assert from_object == from_json == Sampler((STOP,), top_k=20, top_p=0.8, repetition_penalty=1.05)
    assert Sampler.from_generation_config({}, [STOP]) == Sampler((STOP,))


def test_a_config_without_a_penalty_gets_the_default_repetition_control():
    default = Sampler.from_generation_config({}, [STOP], ReplyControls())
    assert default.repetition_penalty == DEFAULT_REPETITION_PENALTY
    assert default.penalty_window == DEFAULT_REPETITION_WINDOW
    # The model's own penalty is kept; a setting overrides it; 1.0 turns it off.
    assert Sampler.from_generation_config({"repetition_penalty": 1.05}, [STOP], ReplyControls()).repetition_penalty == 1.05
    assert Sampler.from_generation_config({"repetition_penalty": 1.05}, [STOP],
                                          ReplyControls(penalty=1.2)).repetition_penalty == 1.2
    assert Sampler.from_generation_config({}, [STOP], ReplyControls(penalty=1.0)).repetition_penalty is None


def test_a_config_without_top_k_or_top_p_gets_qwens_published_ones():
    default = Sampler.from_generation_config({}, [STOP], ReplyControls())
    assert (default.top_k, default.top_p) == (DEFAULT_TOP_K, DEFAULT_TOP_P) == (20, 0.8)
    # The model's own values are kept; a setting overrides them; 0 and 1.0 turn them off.
    own = Sampler.from_generation_config({"top_k": 40, "top_p": 0.9}, [STOP], ReplyControls())
    assert (own.top_k, own.top_p) == (40, 0.9)
    off = Sampler.from_generation_config({"top_k": 40, "top_p": 0.9}, [STOP], ReplyControls(top_k=0, top_p=1.0))
    assert (off.top_k, off.top_p) == (None, None)
    # Without controls (the config as it is) nothing is filled in.
    assert Sampler.from_generation_config({}, [STOP]).top_k is None


def test_the_penalty_window_covers_the_latest_tokens_of_prompt_and_reply():
    sampler = Sampler((STOP,), repetition_penalty=2.0, penalty_window=3)
    r = row(prompt=(5, 6, 7, 8))
    r.tokens = [9]
    assert sampler._penalized(r) == [7, 8, 9]
    r.tokens = [9, 10, 11, 12]
    assert sampler._penalized(r) == [10, 11, 12]
    logits = np.zeros((1, 13), dtype=np.float32)
    logits[0, 5] = 1.0   # outside the window: not penalized, so still the largest
    logits[0, 12] = 1.5  # inside it: 1.5 / 2 = 0.75
    assert sampler.choose(logits, [r]) == [5]
    assert Sampler((STOP,), repetition_penalty=2.0)._penalized(r) == [5, 6, 7, 8, 9, 10, 11, 12]


def test_no_repeat_ngram_never_completes_an_ngram_the_reply_holds():
    sampler = Sampler((STOP,), no_repeat_ngram=3)
    r = row()
    r.tokens = [1, 2, 4, 1, 2]  # "1 2 4" is there: after "1 2", 4 is banned
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, 4], logits[0, 7] = 5.0, 1.0
    assert sampler.choose(logits, [r]) == [7]
    assert logits[0, 4] == 5.0  # the caller's logits are left as they were
    assert Sampler((STOP,)).choose(logits, [r]) == [4]


def test_no_copy_ngram_never_copies_an_ngram_of_the_jobs_text_but_may_always_stop():
    sampler = Sampler((STOP,), no_copy_ngram=3)
    r = row()
    r.copy_index = sampler.copy_index([8, 1, 2, 4, 1, 2, STOP])  # the job's text holds "1 2 4" and "1 2 STOP"
    r.tokens = [9, 1, 2]
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, 4], logits[0, 7] = 5.0, 1.0
    assert sampler.choose(logits, [r]) == [7]  # after "1 2", copying 4 is banned
    logits[0, STOP] = 9.0
    assert sampler.choose(logits, [r]) == [STOP]  # the stop token is never banned
    r.tokens = [9, 1]  # the text holds no "9 1": nothing to copy on from
    logits[0, STOP] = 0.0
    assert sampler.choose(logits, [r]) == [4]
    assert Sampler((STOP,)).choose(logits, [r]) == [4]


def test_no_copy_ngram_is_a_setting_and_1_is_refused():
    from worker.settings import WorkerSettings

    assert WorkerSettings(no_copy_ngram=4).reply_controls.no_copy_ngram == 4
    sampler = Sampler.from_generation_config({}, [STOP], WorkerSettings(no_copy_ngram=4).reply_controls)
    assert sampler.no_copy_ngram == 4
    with pytest.raises(ValueError, match="NO_COPY_NGRAM"):
        WorkerSettings(no_copy_ngram=1)
