"""Cheap, model-free checks of the service's empathetic replies on a prompt set.

No judge model runs on this CPU, so each reply gets surface signals that catch the
failures seen in practice: a reply in the wrong language, an echo of the user's text,
a decoding loop, a reply cut mid-sentence, and a review answered in the wrong tone.
Stdlib only, so it loads wherever the producer does.
"""

from __future__ import annotations

import json
import statistics
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("venting", "knowledge", "smalltalk", "request", "reasoning", "review", "everyday")
POLARITIES = ("positive", "negative")
REQUIRED_FIELDS = ("id", "kind", "lang", "text")

#: A negative review (or bad news) should first be acknowledged: an apology or empathy.
ACKNOWLEDGING = {
    "zh": ("抱歉", "对不起", "歉意", "理解您", "理解你", "遗憾", "不好意思", "辛苦", "失望", "不满",
           "给您带来", "给你带来", "心情", "感受", "难过", "生气", "糟糕", "委屈", "不愉快", "烦心"),
    "en": ("sorry", "apolog", "understand", "frustrat", "disappoint", "regret", "that sounds",
           "unfortunately", "inconvenien", "must have been", "upsetting", "annoying"),
}
#: A positive review (or good news) should be met with thanks or shared joy.
JOYFUL = {
    "zh": ("谢谢", "感谢", "开心", "高兴", "很高兴", "太好了", "喜欢", "满意", "祝", "棒", "真好",
           "欣慰", "恭喜", "喜悦"),
    "en": ("thank", "glad", "happy", "great to hear", "delighted", "wonderful", "enjoy", "pleased",
           "congrat", "awesome", "love"),
}
#: Phrases removed before matching, since they contain a marker without meaning it
#: ("thanks for your understanding" acknowledges nothing; "不开心" is not joy).
NOT_ACKNOWLEDGING = ("您的理解", "你的理解", "your understanding", "for understanding")
NOT_JOYFUL = ("不开心", "不高兴", "不满意", "不喜欢", "不太开心", "不太高兴", "不太满意", "不太喜欢",
              "unhappy", "not happy", "not glad", "not pleased")

#: A refusal is never a fitting answer to a review, whatever apology it carries.
REFUSALS = ("无法协助", "无法帮助", "不能协助", "无法完成这个请求", "can't assist", "cannot assist",
            "can't help with that", "cannot help with that", "unable to assist")

SENTENCE_ENDS = "。！？!?.…"
CLOSERS = "」』”’\"')）]】》"
COPY_LIMIT = 0.5
ECHO_LIMIT = 0.8
REPEAT_LIMIT = 0.3


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
            or 0x20000 <= cp <= 0x2FFFF)


def _is_latin(ch: str) -> bool:
    return ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")


def language_of(text: str) -> str:
    """"zh", "en" or "other": 30% ideographs make it Chinese, since zh replies quote English terms."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return "other"
    cjk = sum(map(_is_cjk, letters))
    latin = sum(map(_is_latin, letters))
    if cjk >= 0.3 * len(letters):
        return "zh"
    return "en" if latin > 0.5 * len(letters) else "other"


def char_ngrams(text: str, n: int = 4) -> list[str]:
    """Character n-grams: they work for Chinese, which has no spaces between words."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    flat = " ".join(text.split()).lower()
    return [flat[i:i + n] for i in range(len(flat) - n + 1)]


def copy_share(reply: str, prompt: str, n: int = 4) -> float:
    """Share of the reply's n-grams found in the prompt: a high share is parroting, not replying."""
    grams = char_ngrams(reply, n)
    if not grams:
        return 0.0
    seen = set(char_ngrams(prompt, n))
    return sum(gram in seen for gram in grams) / len(grams)


def repeat_share(reply: str, n: int = 4) -> float:
    """(count - distinct) / count of the reply's n-grams: a small model's loops repeat itself."""
    grams = char_ngrams(reply, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _is_closer(ch: str) -> bool:
    return ch in CLOSERS or ch in "\ufe0f\u200d" or unicodedata.category(ch) in ("So", "Sk")


def cut_mid_sentence(reply: str, stop_reason: str | None) -> bool:
    """True when a token or time limit stopped the reply before a sentence end (empty is not "cut")."""
    if stop_reason not in ("length", "deadline") or not reply.strip():
        return False
    tail = reply.rstrip()
    while tail and (_is_closer(tail[-1]) or tail[-1].isspace()):
        tail = tail[:-1]
    return not tail or tail[-1] not in SENTENCE_ENDS


def _has_marker(reply: str, lang: str, markers: dict[str, tuple[str, ...]], ignore: tuple[str, ...]) -> bool:
    text = reply.lower()
    for phrase in ignore:
        text = text.replace(phrase, " ")
    lists = [markers[lang]] if lang in markers else list(markers.values())
    return any(marker in text for words in lists for marker in words)


def is_refusal(reply: str) -> bool:
    text = reply.lower().replace("’", "'")
    return any(phrase in text for phrase in REFUSALS)


def fits_review(reply: str, polarity: str | None, lang: str) -> bool | None:
    """Whether the tone fits: a negative one needs acknowledgement (thanks alone won't do), a positive one
    thanks or joy. ``lang`` picks the marker list (any other value checks them all).
    """
    if polarity is None:
        return None
    if is_refusal(reply):
        return False
    if polarity == "negative":
        return _has_marker(reply, lang, ACKNOWLEDGING, NOT_ACKNOWLEDGING)
    if polarity == "positive":
        return _has_marker(reply, lang, JOYFUL, NOT_JOYFUL)
    raise ValueError(f"polarity must be one of {POLARITIES} or None, got {polarity!r}")


@dataclass(frozen=True)
class ReplyScore:
    id: str
    kind: str
    lang: str
    polarity: str | None
    text: str
    reply: str
    stop_reason: str | None
    reply_lang: str
    copy_share: float
    repeat_share: float
    empty: bool
    cut: bool
    chars: int
    #: Tone check for every prompt with a polarity (reviews and venting); summaries count reviews only.
    fits_review: bool | None
    #: Not empty, in the expected language, mostly its own words and not looping.
    usable: bool
    #: The language the reply should be in: the prompt's, or its ``reply_lang`` (a translation request).
    expected_lang: str
    echo: bool
    loop: bool


def score_reply(item: dict[str, Any], reply: str, stop_reason: str | None) -> ReplyScore:
    """Every signal for one reply to one prompt of the set (a read_prompts item)."""
    reply_lang = language_of(reply)
    copied = copy_share(reply, item["text"])
    repeated = repeat_share(reply)
    empty = reply.strip() == ""
    polarity = item.get("polarity")
    expected = item.get("reply_lang") or item["lang"]
    return ReplyScore(
        id=item["id"], kind=item["kind"], lang=item["lang"], polarity=polarity, text=item["text"],
        reply=reply, stop_reason=stop_reason, reply_lang=reply_lang,
        copy_share=copied, repeat_share=repeated, empty=empty,
        cut=cut_mid_sentence(reply, stop_reason), chars=len(reply.strip()),
        # The reply's own language picks the markers: a wrong language is counted apart, by lang.
        fits_review=fits_review(reply, polarity, reply_lang),
        usable=(not empty and reply_lang == expected and copied <= COPY_LIMIT
                and repeated <= REPEAT_LIMIT),
        expected_lang=expected,
        echo=copied > ECHO_LIMIT,
        loop=stop_reason in ("length",) and repeated > REPEAT_LIMIT,
    )


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(scores: list[ReplyScore]) -> dict[str, Any]:
    """Counts and shares over the scores; shares and means are None when there is nothing to average."""
    fits = [s.fits_review for s in scores if s.kind == "review" and s.fits_review is not None]
    return {
        "n": len(scores),
        "usable": _share([s.usable for s in scores]),
        "lang_match": _share([s.reply_lang == s.expected_lang for s in scores]),
        "echo": sum(s.echo for s in scores),
        "loop": sum(s.loop for s in scores),
        "empty": sum(s.empty for s in scores),
        "cut": sum(s.cut for s in scores),
        "copy_mean": _mean([s.copy_share for s in scores]),
        "repeat_mean": _mean([s.repeat_share for s in scores]),
        "chars_mean": _mean([s.chars for s in scores]),
        "chars_median": statistics.median([s.chars for s in scores]) if scores else None,
        "review_fit": _share(fits),
        "review_n": len(fits),
    }


def per_kind(scores: list[ReplyScore]) -> dict[str, dict[str, Any]]:
    """summarize() for each kind, in KINDS order (unknown kinds after, by name)."""
    kinds = sorted({s.kind for s in scores}, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))
    return {kind: summarize([s for s in scores if s.kind == kind]) for kind in kinds}


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _row(name: str, s: dict[str, Any]) -> list[str]:
    fit = "-" if s["review_fit"] is None else f"{s['review_fit']:.2f} n={s['review_n']}"
    chars = f"{_num(s['chars_mean'], '.0f')}/{_num(s['chars_median'], '.0f')}"
    return [name, str(s["n"]), _num(s["usable"]), _num(s["lang_match"]), _num(s["copy_mean"]),
            _num(s["repeat_mean"]), str(s["echo"]), str(s["loop"]), str(s["cut"]), chars, fit]


def format_tables(summary: dict[str, Any], per_kind: dict[str, dict[str, Any]]) -> str:
    """One line per kind and a total line; usable/lang are shares, copy/repeat means, chars mean/median."""
    header = ["kind", "n", "usable", "lang", "copy", "repeat", "echo", "loop", "cut", "chars", "review-fit"]
    rows = [header] + [_row(kind, s) for kind, s in per_kind.items()] + [_row("total", summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _check_item(item: object, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in item:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(item[field], str) or not item[field]:
            raise ValueError(f"{where}: field {field!r} must be a non-empty string")
    polarity = item.get("polarity")
    if polarity is not None and polarity not in POLARITIES:
        raise ValueError(f"{where}: polarity must be one of {POLARITIES} or null, got {polarity!r}")
    return {**item, "polarity": polarity}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt set (JSONL); every error names its line, since the file is edited by hand."""
    items: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            item = _check_item(raw, where)
            key = item["id"]
            if key in first_line:
                raise ValueError(f"{where}: duplicate id {key!r} (first on line {first_line[key]})")
            first_line[key] = number
            items.append(item)
    return items
