"""Continuous decoding (worker/engine/session.py) on every engine: replies join and leave between steps."""

from __future__ import annotations

import math

import pytest

from worker.engine import StopReason
from worker.engine.session import ReplySession, run_to_end
from tests.test_engine_contract import engine, greedy  # noqa: F401  (the engine fixture, per engine)

LONG = "送餐太慢了，等了两个小时，菜都凉了，打电话也没人接，再也不点这家了。" * 3


def _alone(engine, request):  # noqa: F811
    return engine.reply_batch([request], history_max_tokens=256)[0]


def test_a_reply_that_joins_a_running_session_is_what_it_is_alone(engine):  # noqa: F811
    first, joiner = greedy("好吃", max_new_tokens=24, min_new_tokens=24), greedy(LONG, max_new_tokens=10)
    with ReplySession(engine, 2, history_max_tokens=256, prefill_chunk=8) as session:
        results = {}
        a = session.add(first)
        for _ in range(5):
            results.update(session.step())
        assert len(session.tokens(a)) >= 3  # the first reply is decoding when the second joins
        b = session.add(joiner)
        while len(session):
            results.update(session.step())
    assert results[a] == _alone(engine, first)
    assert results[b] == _alone(engine, joiner)


def test_a_long_prompt_is_read_in_chunks_while_the_running_rows_keep_decoding(engine):  # noqa: F811
    running = greedy("好吃", max_new_tokens=200, min_new_tokens=200)
    with ReplySession(engine, 2, history_max_tokens=256, prefill_chunk=8) as session:
        a = session.add(running)
        for _ in range(3):
            session.step()
        b = session.add(greedy(LONG, max_new_tokens=4))
        prompt_rest = session.prompt_left(b)
        steps, before = 0, len(session.tokens(a))
        while not session.tokens(b):
            session.step()
            steps += 1
        # Every step gave the running row its token; the joiner's prompt took several steps.
        assert len(session.tokens(a)) - before == steps
        assert steps >= math.ceil(prompt_rest / 8) >= 4


def test_rows_free_up_for_the_replies_that_wait(engine):  # noqa: F811
    requests = [greedy(text, max_new_tokens=4 + 3 * i) for i, text in enumerate(["好吃", LONG, "一般般吧", "还行"])]
    with ReplySession(engine, 1, history_max_tokens=256) as session:
        order, results = [], {}
        for index, result in run_to_end(session, requests):
            order.append(index)
            results[index] = result
    assert order == [0, 1, 2, 3]  # one row: each reply after the one before
    assert [results[i] for i in range(4)] == [_alone(engine, r) for r in requests]


def test_a_cancelled_row_leaves_and_the_others_go_on(engine):  # noqa: F811
    requests = [greedy("好吃", max_new_tokens=20, min_new_tokens=20), greedy("还行", max_new_tokens=20, min_new_tokens=20)]
    steps = []

    def cancel_the_first_at_step_five(tokens):
        steps.append([len(t) for t in tokens])
        return [0] if len(steps) == 5 else []

    with ReplySession(engine, 2, history_max_tokens=256) as session:
        results = dict(run_to_end(session, requests, cancel_the_first_at_step_five))
    # It keeps what it had when it was cancelled, and no more.
    assert results[0].stop_reason is StopReason.CANCELLED and results[0].generated_tokens == steps[4][0] > 0
    assert results[1] == _alone(engine, requests[1])


def test_a_chunked_sentiment_is_the_sentiment_of_one_pass(engine):  # noqa: F811
    items = [(LONG, "zh"), ("好吃", "en"), ("一般般吧", "zh")]
    one_pass = engine.classify_batch(items)
    with engine.classify_in_chunks(items, 16) as chunked:
        advances = 1
        while not chunked.advance():
            advances += 1
    assert advances >= 4  # LONG alone is more than four chunks of 16
    for ours, theirs in zip(chunked.results, one_pass):
        assert ours.label == theirs.label and ours.prompt_tokens == theirs.prompt_tokens
        for word, probability in theirs.probabilities.items():
            assert ours.probabilities[word] == pytest.approx(probability, abs=1e-4)


def test_a_label_set_the_model_cannot_answer_is_an_error_in_its_place(engine):  # noqa: F811
    engine.unavailable_label_sets["en3"] = "labels='en3' is not available (test)"
    try:
        with engine.classify_in_chunks([("好吃", "en3"), ("好吃", "zh")], 256) as chunked:
            while not chunked.advance():
                pass
    finally:
        del engine.unavailable_label_sets["en3"]
    assert isinstance(chunked.results[0], ValueError) and chunked.results[1].label in ("正面", "负面")


def test_a_reply_cancelled_while_it_waits_for_a_row_never_runs(engine):  # noqa: F811
    requests = [greedy("好吃", max_new_tokens=6, min_new_tokens=6), greedy("还行", max_new_tokens=6)]
    with ReplySession(engine, 1, history_max_tokens=256) as session:  # one row: the second waits
        results = dict(run_to_end(session, requests, lambda tokens: [1]))
    assert results[1].stop_reason is StopReason.CANCELLED and results[1].generated_tokens == 0
    assert results[0] == _alone(engine, requests[0])


def test_the_copy_rule_covers_the_jobs_own_tokens_not_the_shared_prefix(engine):  # noqa: F811
    request = greedy(LONG, max_new_tokens=4)
    prompt = engine.reply_prompt(LONG, [], request.mood)
    own = prompt[len(engine.reply_prefix_for(LONG, request.mood).ids):]
    with ReplySession(engine, 1, history_max_tokens=256) as session:
        key = session.add(request)
        index = session._replies[key].decode.copy_index
    n = engine.sampler.no_copy_ngram
    assert n == 4 and index == engine.sampler.copy_index(own)
    assert index and all(len(gram) == n - 1 for gram in index)
    assert sum(len(follows) for follows in index.values()) <= len(own) - n + 1 < len(prompt) - n + 1
