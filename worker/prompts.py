"""The prompts: what the model is told for each of its two jobs.

The classifier prompt lives in its own context (never mixed with the chat
history) and names the exact label words whose next-token scores decide.
"""

from __future__ import annotations

from producer.protocol import LABEL_SETS

_GUIDE_ZH = "抱怨、失望、批评、不满属于“{negative}”；满意、称赞、感谢、推荐属于“{positive}”。"
_GUIDE_ZH3 = _GUIDE_ZH + "没有明显褒贬、只陈述事实的属于“{neutral}”。"
_GUIDE_EN = "Complaints, disappointment and criticism are {negative}; satisfaction, praise and thanks are {positive}."
_GUIDE_EN3 = _GUIDE_EN + " Plain statements of fact with no clear feeling are {neutral}."
# Short examples written for this prompt, from no data set.
_EXAMPLES_ZH = "例如：“客服很耐心，问题很快解决了”→{positive}；“等了三天还没发货，太失望了”→{negative}。"
_EXAMPLES_EN = 'For example: "The staff were patient and fixed it fast" -> {positive}; "Three days and still not shipped" -> {negative}.'

#: Defaults of CLASSIFIER_PROMPT and POSITIVE_THRESHOLD, chosen on the dev sample (EVAL.md).
DEFAULT_CLASSIFIER_PROMPT = "fewshot"
DEFAULT_POSITIVE_THRESHOLD = 0.45

#: Classifier instructions, by CLASSIFIER_PROMPT variant and label set. EVAL.md compares the variants.
CLASSIFIER_PROMPTS: dict[str, dict[str, str]] = {
    # The original system's wording (reconstructed from its write-up's quote).
    "original": {
        "zh": "你是一个冷酷的情感分析师。判断用户输入的情感倾向，仅输出'{positive}'或'{negative}'。",
        "en": "You are a cold sentiment analyst. Judge the sentiment of the user's input; output only '{positive}' or '{negative}'.",
        "zh3": "你是一个冷酷的情感分析师。判断用户输入的情感倾向，仅输出'{positive}'、'{negative}'或'{neutral}'。",
        "en3": "You are a cold sentiment analyst. Judge the sentiment of the user's input; output only '{positive}', '{negative}' or '{neutral}'.",
    },
    "plain": {
        "zh": "你是一个情感分析器。判断用户这段文字的情感倾向，只回答“{positive}”或“{negative}”，不要输出其他内容。",
        "en": (
            "You are a sentiment classifier. Decide whether the user's text is positive or negative. "
            "Answer with exactly one word: {positive} or {negative}."
        ),
        "zh3": "你是一个情感分析器。判断用户这段文字的情感倾向，只回答“{positive}”、“{negative}”或“{neutral}”，不要输出其他内容。",
        "en3": (
            "You are a sentiment classifier. Decide whether the user's text is positive, negative or neutral. "
            "Answer with exactly one word: {positive}, {negative} or {neutral}."
        ),
    },
    "guided": {
        "zh": "判断用户这段文字的整体情感。" + _GUIDE_ZH + "只回答“{positive}”或“{negative}”。",
        "en": "Judge the overall sentiment of the user's text. " + _GUIDE_EN + " Answer with one word: {positive} or {negative}.",
        "zh3": "判断用户这段文字的整体情感。" + _GUIDE_ZH3 + "只回答“{positive}”、“{negative}”或“{neutral}”。",
        "en3": "Judge the overall sentiment of the user's text. " + _GUIDE_EN3
               + " Answer with one word: {positive}, {negative} or {neutral}.",
    },
    "fewshot": {
        "zh": "判断用户这段文字的整体情感。" + _GUIDE_ZH + _EXAMPLES_ZH + "只回答“{positive}”或“{negative}”。",
        "en": "Judge the overall sentiment of the user's text. " + _GUIDE_EN + " " + _EXAMPLES_EN
              + " Answer with one word: {positive} or {negative}.",
        "zh3": "判断用户这段文字的整体情感。" + _GUIDE_ZH3 + _EXAMPLES_ZH + "只回答“{positive}”、“{negative}”或“{neutral}”。",
        "en3": "Judge the overall sentiment of the user's text. " + _GUIDE_EN3 + " " + _EXAMPLES_EN
               + " Answer with one word: {positive}, {negative} or {neutral}.",
    },
}

# Chosen by reading greedy replies of Qwen2.5-0.5B-Instruct to a few reviews:
# "one or two short sentences" kept it from drifting into lists of advice.
REPLY_SYSTEM_PROMPT = "你是一个温暖、善解人意的助手。请体会用户的感受，用一两句简短、真诚的话回应用户。"


def classifier_prompt(label_set: str, variant: str = DEFAULT_CLASSIFIER_PROMPT) -> str:
    words = dict(zip(("positive", "negative", "neutral"), LABEL_SETS[label_set]))
    return CLASSIFIER_PROMPTS[variant][label_set].format(**words)
