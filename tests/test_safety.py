"""The safety filter (worker/safety.py): spelling tricks do not pass it, and a reply is never shown
ending with the start of a listed term."""

from __future__ import annotations

import pytest

from worker.safety import SafetyFilter, fold

FILTER = SafetyFilter(["badword", "坏话", "村庄"])


@pytest.mark.parametrize("text", [
    "this is a badword here",
    "ＢＡＤＷＯＲＤ",                       # full-width
    "bad\u200bword",                        # zero-width space
    "bad\u200dword",                        # zero-width joiner
    "bad\u00adword",                        # soft hyphen
    "b\u0430dw\u043erd",                    # Cyrillic а and о
    "BАDWОRD",                              # Cyrillic capitals
    "他说了 坏 话",                          # spaces between Chinese characters
    "他說了壞話",                            # traditional
    "小\u2060村\ufeff庄",                    # word joiner, byte-order mark
])
def test_a_spelling_trick_is_still_found(text):
    assert FILTER.find(text), text


@pytest.mark.parametrize("text, found", [
    ("ok ＢＡＤＷＯＲＤ!", "ＢＡＤＷＯＲＤ"),
    ("x bad\u200bword y", "bad\u200bword"),
    ("他说了 坏 话吧", "坏 话"),
    ("他說了壞話", "壞話"),
    ("b\u0430dw\u043erd and badword", "b\u0430dw\u043erd"),
])
def test_matching_reports_the_span_of_the_text_as_written(text, found):
    """Issue 31: matching gave the terms only, not where they stand in the text a client sent."""
    term, start, end = FILTER.spans(text)[0]
    assert text[start:end] == found and FILTER.find(text[start:end]) == [term]


@pytest.mark.parametrize("text", ["bad words", "a good word", "坏人说话", "村里的庄稼"])
def test_what_is_not_a_term_is_not_found(text):
    assert FILTER.find(text) == []


def test_folding_keeps_the_origin_of_every_character():
    text = "Ｂａ\u200bd 坏 话"
    folded, origins = fold(text)
    assert folded == "bad 坏话"
    assert [text[i] for i in origins] == ["Ｂ", "ａ", "d", " ", "坏", "话"]


@pytest.mark.parametrize(("partial", "shown"), [
    ("从前有一个小村", "从前有一个小"),          # ends with the start of 村庄
    ("从前有一个小", "从前有一个小"),            # nothing to hold back
    ("it was a b\u200ba", "it was a "),          # the start of badword, with a zero-width space inside
    ("it was a bad", "it was a "),
    ("it was a cat", "it was a cat"),
])
def test_a_partial_reply_is_shown_without_an_end_that_could_start_a_term(partial, shown):
    assert FILTER.safe_prefix(partial) == shown


def test_a_reply_that_holds_a_term_is_not_shown_at_all():
    assert FILTER.safe_prefix("从前有一个小村庄") is None
    assert FILTER.safe_prefix("ｂａｄｗｏｒｄ!") is None
