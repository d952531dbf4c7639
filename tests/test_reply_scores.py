"""The model-free reply checks (producer.reply_scores) and the shipped prompt set."""

import json
from pathlib import Path

import pytest

from producer.reply_scores import (
    KINDS,
    char_ngrams,
    copy_share,
    cut_mid_sentence,
    fits_review,
    format_tables,
    language_of,
    per_kind,
    read_prompts,
    repeat_share,
    score_reply,
    summarize,
)

PROMPTS = Path(__file__).resolve().parents[1] / "producer" / "reply_prompts.jsonl"
REVIEW_NEG = {"id": "r1", "kind": "review", "lang": "zh", "text": "外卖等了一个半小时才送到，饭都凉了。",
              "polarity": "negative"}
KNOW_EN = {"id": "k1", "kind": "knowledge", "lang": "en", "text": "Why is the sky blue?", "polarity": None}


@pytest.mark.parametrize(("text", "lang"), [
    ("今天心情很好", "zh"),
    ("I had a rough day at work.", "en"),
    # Chinese with English terms stays Chinese: 8 of 15 letters are ideographs.
    ("我用ChatGPT写了一段代码", "zh"),
    # Below 30% ideographs it is not: 4 of 15.
    ("我用ChatGPT写了code", "en"),
    ("Let's meet at the 咖啡店 tomorrow morning", "en"),
    ("", "other"),
    ("123 ... !!!", "other"),
    ("Привет, как дела?", "other"),
    ("안녕하세요", "other"),
])
def test_language_of(text, lang):
    assert language_of(text) == lang


def test_char_ngrams_collapse_whitespace_and_lowercase_latin():
    assert char_ngrams("Ab  c\nD", n=3) == ["ab ", "b c", " c ", "c d"]
    assert char_ngrams("好的。", n=2) == ["好的", "的。"]
    assert char_ngrams("abc") == []
    with pytest.raises(ValueError):
        char_ngrams("abc", n=0)


def test_copy_share():
    prompt = "外卖等了一个半小时才送到，饭都凉了。"
    assert copy_share(prompt, prompt) == 1.0
    assert copy_share("  " + prompt.upper(), prompt) == 1.0
    assert copy_share("非常抱歉让您久等了", prompt) == 0.0
    assert copy_share("短", prompt) == 0.0
    # Half of the reply's 4-grams are the prompt's: "abcd" of "abcdxyzw" (abcd, bcdx, cdxy, dxyz, xyzw).
    assert copy_share("abcdxyzw", "abcd") == pytest.approx(1 / 5)


def test_repeat_share():
    assert repeat_share("多总结，多总结，多总结，多总结，") > 0.6
    assert repeat_share("今天的天气很好，适合出去散步。") == 0.0
    assert repeat_share("") == 0.0
    # abca bcab cabc abca bcab: two of five are repeats.
    assert repeat_share("abcabcab") == pytest.approx(2 / 5)


@pytest.mark.parametrize(("reply", "stop_reason", "cut"), [
    ("我理解你的感受，先好好休息", "length", True),
    ("我理解你的感受，先好好休息。", "length", False),
    ("I hear you, that sounds hard", "deadline", True),
    ("I hear you, that sounds hard.", "deadline", False),
    ("他说：“别担心。”", "length", False),
    ("Take care!! 😊", "length", False),
    ("加油！💪🏻  ", "deadline", False),
    ("待会儿再说……", "length", False),
    ("我理解你的感受，先好好休息", "eos", False),
    ("我理解你的感受，先好好休息", None, False),
    ("   ", "length", False),
])
def test_cut_mid_sentence(reply, stop_reason, cut):
    assert cut_mid_sentence(reply, stop_reason) is cut


@pytest.mark.parametrize(("reply", "polarity", "lang", "fits"), [
    # Thanks and wishes without a word of apology do not answer a complaint.
    ("谢谢您的理解。希望您能尽快吃完餐，享受美食。", "negative", "zh", False),
    ("非常抱歉让您久等了", "negative", "zh", True),
    ("理解您的心情，这次的体验确实很糟糕。", "negative", "zh", True),
    ("Thank you for your understanding. Enjoy your meal!", "negative", "en", False),
    ("I'm so sorry your order arrived late.", "negative", "en", True),
    ("That sounds really frustrating.", "negative", "en", True),
    ("谢谢您的认可，很高兴您喜欢！", "positive", "zh", True),
    ("收到，我们会继续改进。", "positive", "zh", False),
    ("听起来您不太开心。", "positive", "zh", False),
    ("Thanks so much, glad you enjoyed it!", "positive", "en", True),
    ("Sorry to hear you're unhappy.", "positive", "en", False),
    # An unknown language checks every list.
    ("sorry", "negative", "other", True),
])
def test_fits_review(reply, polarity, lang, fits):
    assert fits_review(reply, polarity, lang) is fits


def test_fits_review_without_polarity_is_none_and_an_unknown_one_is_refused():
    assert fits_review("谢谢", None, "zh") is None
    with pytest.raises(ValueError, match="polarity"):
        fits_review("谢谢", "neutral", "zh")


def test_score_reply_flags():
    good = score_reply(REVIEW_NEG, "非常抱歉让您久等了，我们会尽快改进配送。", "eos")
    assert (good.usable, good.echo, good.loop, good.cut, good.empty) == (True, False, False, False, False)
    assert good.fits_review is True and good.reply_lang == "zh" and good.chars == 20

    echo = score_reply(REVIEW_NEG, REVIEW_NEG["text"], "eos")
    assert echo.echo and not echo.usable and echo.copy_share == 1.0

    looping = score_reply(REVIEW_NEG, "多总结，多总结，多总结，多总结，", "length")
    assert looping.loop and looping.cut and not looping.usable
    # The same repetition under EOS is not a loop the token limit stopped, but is still not usable.
    assert not score_reply(REVIEW_NEG, "多总结，多总结，多总结，多总结，", "eos").loop

    wrong_lang = score_reply(REVIEW_NEG, "So sorry for the long wait.", "eos")
    assert not wrong_lang.usable and wrong_lang.reply_lang == "en" and wrong_lang.fits_review is True

    empty = score_reply(KNOW_EN, "  ", "length")
    assert empty.empty and not empty.usable and not empty.cut
    assert empty.fits_review is None and empty.chars == 0


def _scores():
    return [
        score_reply(REVIEW_NEG, "非常抱歉让您久等了，我们会尽快改进配送。", "eos"),  # usable, fits, 20 chars
        score_reply(REVIEW_NEG, "谢谢您的理解。希望您能尽快吃完餐，享受美食。", "eos"),  # usable, does not fit
        score_reply(REVIEW_NEG, REVIEW_NEG["text"], "eos"),  # echo
        score_reply(KNOW_EN, "Because air scatters blue light more than red light", "length"),  # usable, cut
        score_reply(KNOW_EN, "", "eos"),  # empty
    ]


def test_summarize_counts_and_shares():
    scores = _scores()
    s = summarize(scores)
    assert s["n"] == 5
    assert s["usable"] == pytest.approx(3 / 5)
    assert s["lang_match"] == pytest.approx(4 / 5)  # the empty reply has no language
    assert (s["echo"], s["loop"], s["empty"], s["cut"]) == (1, 0, 1, 1)
    assert s["review_n"] == 3
    assert s["review_fit"] == pytest.approx(1 / 3)
    chars = sorted(score.chars for score in scores)
    assert s["chars_median"] == chars[2]
    assert s["chars_mean"] == pytest.approx(sum(chars) / 5)
    assert s["copy_mean"] == pytest.approx(sum(score.copy_share for score in scores) / 5)
    assert s["repeat_mean"] == pytest.approx(sum(score.repeat_share for score in scores) / 5)


def test_per_kind_and_table():
    kinds = per_kind(_scores())
    assert list(kinds) == ["knowledge", "review"]  # KINDS order
    assert kinds["review"]["n"] == 3 and kinds["review"]["usable"] == pytest.approx(2 / 3)
    assert kinds["knowledge"]["review_fit"] is None and kinds["knowledge"]["review_n"] == 0
    assert kinds["knowledge"]["cut"] == 1 and kinds["knowledge"]["empty"] == 1
    table = format_tables(summarize(_scores()), kinds).splitlines()
    assert table[0].split() == ["kind", "n", "usable", "lang", "copy", "repeat", "echo", "loop", "cut",
                                "chars", "review-fit"]
    assert [line.split()[0] for line in table[1:]] == ["knowledge", "review", "total"]
    assert table[2].split()[:3] == ["review", "3", "0.67"] and "0.33 n=3" in table[3]


def test_summarize_nothing():
    s = summarize([])
    assert s["n"] == 0 and s["usable"] is None and s["chars_median"] is None and s["review_fit"] is None
    assert format_tables(s, {}).splitlines()[1].split()[:3] == ["total", "0", "-"]


def _write(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_prompts_fills_polarity(tmp_path):
    path = _write(tmp_path, [json.dumps(KNOW_EN | {"polarity": None}), "",
                             json.dumps({"id": "k2", "kind": "knowledge", "lang": "en", "text": "Why?"})])
    assert [item["polarity"] for item in read_prompts(path)] == [None, None]


@pytest.mark.parametrize(("lines", "message"), [
    ([json.dumps(KNOW_EN), "{not json"], "line 2: not valid JSON"),
    ([json.dumps({"id": "a", "kind": "review", "lang": "zh"})], "line 1: missing field 'text'"),
    ([json.dumps(KNOW_EN), json.dumps(KNOW_EN | {"id": "k2"}), json.dumps(KNOW_EN)],
     "line 3: duplicate id 'k1' \\(first on line 1\\)"),
    (["[1, 2]"], "line 1: expected a JSON object"),
    ([json.dumps(KNOW_EN | {"text": ""})], "line 1: field 'text' must be a non-empty string"),
    ([json.dumps(REVIEW_NEG | {"polarity": "neutral"})], "line 1: polarity must be"),
])
def test_read_prompts_errors_name_the_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_prompts(_write(tmp_path, lines))


def test_the_shipped_prompt_set():
    items = read_prompts(PROMPTS)
    assert len(items) >= 80
    pairs = {(item["kind"], item["lang"]) for item in items}
    assert pairs == {(kind, lang) for kind in KINDS for lang in ("zh", "en")}
    for item in items:
        assert language_of(item["text"]) == item["lang"], item["id"]
        if item["kind"] == "review":
            assert item["polarity"] in ("positive", "negative"), item["id"]
        elif item["kind"] != "venting":
            assert item["polarity"] is None, item["id"]
    for lang in ("zh", "en"):
        reviews = [item["polarity"] for item in items if item["kind"] == "review" and item["lang"] == lang]
        assert reviews.count("positive") == reviews.count("negative")


def test_a_refusal_never_fits_a_review_whatever_apology_it_carries():
    assert fits_review("抱歉，我无法协助完成这个请求。", "negative", "zh") is False
    assert fits_review("I'm sorry, but I can't assist with that.", "negative", "en") is False
    assert fits_review("I’m sorry, but I can’t assist with that.", "negative", "en") is False
    assert fits_review("非常抱歉让您久等了。", "negative", "zh") is True


def test_a_translation_request_expects_the_other_language():
    item = {"id": "t", "kind": "request", "lang": "zh", "text": "把这句话翻译成英文：我们下周二开会。",
            "polarity": None, "reply_lang": "en"}
    assert score_reply(item, "We have a meeting next Tuesday.", "eos").usable
    assert not score_reply(item, "我们下周二开会。", "eos").usable
