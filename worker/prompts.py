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

#: How the reply prompt reads the sentiment just decided: a label of this confidence or more sets
#: the mood of the reply's system prompt; a less sure one (or no label) gets the neutral prompt.
MOOD_CONFIDENCE = 0.7
MOODS = ("neutral", "positive", "negative")

# The first prompt: chosen by reading greedy replies of Qwen2.5-0.5B-Instruct to a few reviews
# ("one or two short sentences" kept it from drifting into lists of advice). It ignores the mood.
_ORIGINAL_REPLY = "你是一个温暖、善解人意的助手。请体会用户的感受，用一两句简短、真诚的话回应用户。"
# One system prompt that fits the request: warm and short for feelings, complete for a task, in the
# user's language. The mood sentences tell the model the sentiment the classifier just decided.
_FITTING_REPLY = ("你是一个温暖、贴心的助手。用户用什么语言，你就用什么语言回答。"
                  "如果用户请你做事（写请假条、列清单、解释、计算、翻译），就直接把事情完整做好；"
                  "如果用户在倾诉或闲聊，用一两句真诚、具体的话回应。不要重复用户的原话。")
_MOOD_ZH = {
    "neutral": "",
    "positive": "用户此刻的情绪是正面的：分享他的喜悦；如果他在称赞商品或服务，真诚地感谢他。",
    "negative": "用户此刻的情绪是负面的：先体谅他的感受；如果他在抱怨商品或服务，先真诚道歉，再说明会怎样帮他解决。",
}

# Example turns, written for this prompt (no data set): a small model imitates what it is shown far
# better than what it is told, and these show it answering a review instead of repeating it.
_EXAMPLES = (
    ("买的台灯用了两天就不亮了，联系客服也没人回。",
     "真抱歉，台灯这么快就坏了，客服又联系不上，确实让人着急。建议您在订单页直接申请退换货，如果还有问题，我也可以帮您想办法。"),
    ("The pizza came quickly and was still hot. Loved it!",
     "Thank you so much! We're glad your pizza arrived hot and that you loved it. Enjoy, and see you next time!"),
    ("帮我写一句给同事的生日祝福。",
     "祝你生日快乐！愿新的一岁工作顺心、身体健康，每天都有好心情！"),
    ("I failed my driving test again today.",
     "I'm sorry, that's really disappointing. Lots of people need a few tries: note what tripped you up, "
     "practise that, and you'll be ready next time."),
)

#: Reply system prompts, by REPLY_PROMPT variant and mood. EVAL.md compares the variants.
REPLY_PROMPTS: dict[str, dict[str, str]] = {
    "original": {mood: _ORIGINAL_REPLY for mood in MOODS},
    "fitting": {mood: _FITTING_REPLY for mood in MOODS},
    "mood": {mood: _FITTING_REPLY + _MOOD_ZH[mood] for mood in MOODS},
    "examples": {mood: _FITTING_REPLY for mood in MOODS},
    "mood-examples": {mood: _FITTING_REPLY + _MOOD_ZH[mood] for mood in MOODS},
}
#: Variants whose prefix also holds the example turns.
_WITH_EXAMPLES = {"examples", "mood-examples"}
DEFAULT_REPLY_PROMPT = "mood"
#: The default variant's prompt with no mood: what benchmarks send to peers that have no classifier.
REPLY_SYSTEM_PROMPT = REPLY_PROMPTS[DEFAULT_REPLY_PROMPT]["neutral"]


def reply_mood(label_set: str, label: str | None, confidence: float | None) -> str:
    """The mood a reply is written in: the sentiment's polarity when the classifier is sure of it."""
    words = LABEL_SETS.get(label_set, ())
    if label not in words or confidence is None or confidence < MOOD_CONFIDENCE:
        return "neutral"
    return ("positive", "negative", "neutral")[words.index(label)]


def reply_system_prompt(mood: str = "neutral", variant: str = DEFAULT_REPLY_PROMPT) -> str:
    return REPLY_PROMPTS[variant][mood]


def reply_prefix_messages(mood: str = "neutral", variant: str = DEFAULT_REPLY_PROMPT) -> list[dict[str, str]]:
    """The fixed start of every reply prompt: the system message, and the example turns if the variant
    has them (cached once per mood, so they cost a job no prefill)."""
    messages = [{"role": "system", "content": reply_system_prompt(mood, variant)}]
    if variant in _WITH_EXAMPLES:
        for user, assistant in _EXAMPLES:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def classifier_prompt(label_set: str, variant: str = DEFAULT_CLASSIFIER_PROMPT) -> str:
    words = dict(zip(("positive", "negative", "neutral"), LABEL_SETS[label_set]))
    return CLASSIFIER_PROMPTS[variant][label_set].format(**words)
