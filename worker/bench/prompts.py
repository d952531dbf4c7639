"""Classifier prompt layouts and label words compared in process, for EVAL.md.

The service's prompt is one system message (``CLASSIFIER_PROMPT``) with the
user's text as the user message, decided on the first token of 正面/负面.
This bench asks whether anything else the model could be told does better:
other layouts (the question after the text, examples as earlier chat turns)
and other label words, all scored in one uncached forward pass per review at
the service's DTYPE. Nothing here is used by the service.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from producer.evaluate import Row
from worker.engine.prompts import CLASSIFIER_PROMPTS, classifier_prompt

#: Label-word pairs scored at the answer position: (name, positive word, negative word).
WORD_PAIRS = (("正面/负面", "正面", "负面"), ("积极/消极", "积极", "消极"),
              ("好评/差评", "好评", "差评"), ("positive/negative", "positive", "negative"))

_QUESTION_ZH = "这条评论的情感倾向是正面还是负面？只回答“正面”或“负面”。"
_QUESTION_EN = "Is the sentiment of this review positive or negative? Answer with one word: positive or negative."
# Written for this bench, one per domain and none about food delivery; two are mixed
# reviews whose overall verdict decides, one thanks a courier for a hard job.
_EXAMPLE_TURNS = (
    ("房间干净，前台服务也很热情，下次还住这家。", "正面"),
    ("手机用了两天就死机，客服一直推脱。", "负面"),
    ("价格有点贵，不过味道确实好，值得。", "正面"),
    ("书的内容很一般，印刷倒还清楚，不值这个价。", "负面"),
    ("快递小哥冒雨送货上门，辛苦了！", "正面"),
    ("电影节奏拖沓，看到一半就想走。", "负面"),
)

Messages = list[dict[str, str]]


def _system_then_text(system: str) -> Callable[[str], Messages]:
    return lambda text: [{"role": "system", "content": system}, {"role": "user", "content": text}]


def _question_after(question: str, label: str) -> Callable[[str], Messages]:
    return lambda text: [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": f"{label}{text}\n\n{question}"}]


def _example_turns(text: str) -> Messages:
    messages = [{"role": "system", "content": classifier_prompt("zh", "plain")}]
    for example, answer in _EXAMPLE_TURNS:
        messages += [{"role": "user", "content": example}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": text}]


def layouts() -> dict[str, Callable[[str], Messages]]:
    """Layout name -> the chat messages for one review; the first ones are the service's own."""
    found = {f"system:{name}": _system_then_text(classifier_prompt("zh", name))
             for name in CLASSIFIER_PROMPTS}
    found["question-after-zh"] = _question_after(_QUESTION_ZH, "评论：")
    found["question-after-en"] = _question_after(_QUESTION_EN, "Review: ")
    found["example-turns"] = _example_turns
    return found


@dataclass
class PromptRow:
    layout: str
    words: str
    #: Accuracy when positive means p(positive) >= 0.5.
    accuracy: float
    best_threshold: float
    best_accuracy: float


def p_positive(scores: dict[str, float], positive: str, negative: str) -> float:
    """The probability of ``positive`` among the two words, as the service computes it."""
    return 1 / (1 + math.exp(scores[negative] - scores[positive]))


def measure_prompts(scorer, examples: list[Row], names: list[str] | None = None) -> list[PromptRow]:
    """``scorer``: a ``worker.bench.wordscores.WordScorer`` loaded with WORD_PAIRS' words."""
    available = layouts()
    unknown = set(names or []) - set(available)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}; known: {', '.join(available)}")
    golds = [example.gold for example in examples]
    results = []
    for name, build in available.items():
        if names and name not in names:
            continue
        scores = [scorer.scores(build(example.text)) for example in tqdm(examples, desc=name, unit="review")]
        for words, positive, negative in WORD_PAIRS:
            probabilities = [p_positive(s, positive, negative) for s in scores]
            best_accuracy, best_threshold = max(
                (_accuracy(probabilities, golds, t / 20), t / 20) for t in range(1, 20))
            results.append(PromptRow(name, words, _accuracy(probabilities, golds, 0.5), best_threshold, best_accuracy))
    return results


def _accuracy(p_positive: list[float], golds: list[int], threshold: float) -> float:
    return sum((p >= threshold) == (gold == 0) for p, gold in zip(p_positive, golds)) / len(golds)


def format_prompts(rows: list[PromptRow]) -> str:
    lines = ["| layout | label words | accuracy at 0.50 | best threshold | accuracy at best |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.layout} | {row.words} | {row.accuracy:.3f} | {row.best_threshold:.2f} | "
                     f"{row.best_accuracy:.3f} |")
    return "\n".join(lines)
