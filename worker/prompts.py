"""The prompts: what the model is told for each of its two jobs.

The classifier prompt lives in its own context (never mixed with the chat
history) and names the exact label words whose next-token scores decide.
"""

from __future__ import annotations

from producer.protocol import LABEL_SETS

CLASSIFIER_PROMPTS: dict[str, str] = {
    "zh": "你是一个情感分析器。判断用户这段文字的情感倾向，只回答“{positive}”或“{negative}”，不要输出其他内容。",
    "en": (
        "You are a sentiment classifier. Decide whether the user's text is positive or negative. "
        "Answer with exactly one word: {positive} or {negative}."
    ),
}

# Chosen by reading greedy replies of Qwen2.5-0.5B-Instruct to a few reviews:
# "one or two short sentences" kept it from drifting into lists of advice.
REPLY_SYSTEM_PROMPT = "你是一个温暖、善解人意的助手。请体会用户的感受，用一两句简短、真诚的话回应用户。"


def classifier_prompt(label_set: str) -> str:
    positive, negative = LABEL_SETS[label_set]
    return CLASSIFIER_PROMPTS[label_set].format(positive=positive, negative=negative)
