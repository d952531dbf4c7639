"""The prompts: what the model is told for each of its two jobs.

The classifier prompt lives in its own context (never mixed with the chat
history) and names the exact label words whose next-token scores decide.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobqueue.labels import LABEL_SETS

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
#: Languages a reply prompt is written in; a text is "zh" when ideographs are 30% of its letters.
REPLY_LANGUAGES = ("zh", "en")

# The first prompt: chosen by reading greedy replies of Qwen2.5-0.5B-Instruct to a few reviews
# ("one or two short sentences" kept it from drifting into lists of advice). It ignores the mood.
_ORIGINAL = "你是一个温暖、善解人意的助手。请体会用户的感受，用一两句简短、真诚的话回应用户。"
# One system prompt that fits the request: warm and short for feelings, complete for a task, in the
# user's language. The mood sentences tell the model the sentiment the classifier just decided.
_FITTING = {
    "zh": ("你是一个温暖、贴心的助手。用户用什么语言，你就用什么语言回答。"
           "如果用户请你做事（写请假条、列清单、解释、计算、翻译），就直接把事情完整做好；"
           "如果用户在倾诉或闲聊，用一两句真诚、具体的话回应。不要重复用户的原话。"),
    "en": ("You are a warm, caring assistant. Answer in the language the user writes in. If the user asks you "
           "to do something (write a note, make a list, explain, calculate, translate), do it completely. If the "
           "user shares feelings or chats, reply with one or two sincere, specific sentences. Never repeat the "
           "user's words back."),
}
_MOOD = {
    "zh": {"neutral": "",
           "positive": "用户此刻的情绪是正面的：分享他的喜悦；如果他在称赞商品或服务，真诚地感谢他。",
           "negative": "用户此刻的情绪是负面的：先体谅他的感受；如果他在抱怨商品或服务，先真诚道歉，再说明会怎样帮他解决。"},
    "en": {"neutral": "",
           "positive": " The user's mood is positive: share their joy, and if they praise a product or service, "
                       "thank them warmly.",
           "negative": " The user's mood is negative: first acknowledge how they feel; if they complain about a "
                       "product or service, apologise sincerely, then say how you will help put it right."},
}
# Example turns, written for this prompt (no data set, and on no topic of the evaluation's prompt set):
# a small model imitates what it is shown far better than what it is told, and these show it answering
# a review instead of repeating it. One set per language: shown English, it answers Chinese in English.
_EXAMPLES = {
    "zh": (
        ("买的台灯用了两天就不亮了，联系客服也没人回。",
         "真抱歉，台灯这么快就坏了，客服又联系不上，确实让人着急。建议您在订单页直接申请退换货，如果还有问题，我也可以帮您想办法。"),
        ("披萨送得很快，到手还是热的，太好吃了！",
         "谢谢您的夸奖！很高兴披萨热乎乎地送到，您吃得开心就好，期待下次再为您服务！"),
        ("帮我写一句提醒大家周五前交周报的通知。",
         "温馨提醒：请大家在本周五下班前提交周报，谢谢配合！"),
        ("我养的多肉全被晒死了，好心疼。",
         "辛辛苦苦养大的多肉没了，真的会心疼。下次夏天可以把它们挪到散射光的地方，再试一次吧！"),
    ),
    "en": (
        ("The lamp I bought stopped working after two days, and support never answered.",
         "I'm so sorry your lamp failed so quickly and that support didn't get back to you. You can request a "
         "replacement or refund from your order page, and I'm happy to help if anything gets stuck."),
        ("The pizza came quickly and was still hot. Loved it!",
         "Thank you so much! We're glad your pizza arrived hot and that you loved it. See you next time!"),
        ("Write a one-line reminder that weekly reports are due Friday.",
         "Friendly reminder: please send in your weekly report by the end of Friday. Thanks!"),
        ("All my houseplants died while I was away.",
         "Oh no, that's sad after all the care you gave them. A friend or a self-watering pot can keep the next "
         "ones going while you travel."),
    ),
}


# The short variant: the same rules, the mood in a few words and one example turn per language (a
# complaint answered): every decoding step attends over the prefix, so its length is reply time.
_BRIEF = {
    "zh": "你是温暖贴心的助手，用用户的语言回答。用户请你做事就完整做好；倾诉、闲聊或评价就用一两句真诚的话回应，不复述原话。",
    "en": ("You are a warm, caring assistant. Reply in the user's language. Do what is asked completely; answer "
           "feelings, chat and reviews in one or two sincere sentences, never repeating the user's words."),
}
_BRIEF_MOOD = {
    "zh": {"neutral": "", "positive": "用户满意：真诚感谢，分享喜悦。", "negative": "用户不满：先道歉或体谅，再说怎么帮他。"},
    "en": {"neutral": "", "positive": " The user is happy: thank them and share the joy.",
           "negative": " The user is unhappy: apologise or empathise first, then offer help."},
}
_BRIEF_EXAMPLES = {
    "zh": (("台灯两天就坏了，客服也不回。", "真抱歉让您失望了！您可以在订单页申请换货，有问题我帮您跟进。"),),
    "en": (("My lamp broke after two days and support never replied.",
            "I'm so sorry about that! You can request a replacement from your order page, and I'm glad to help."),),
}


# `brief` with a second example turn, praise answered: `brief` alone fitted too few replies to praise.
_BRIEF_REVIEW_EXAMPLES = {
    "zh": (*_BRIEF_EXAMPLES["zh"], ("披萨送得很快，还是热的，太好吃了！", "谢谢您的夸奖！很高兴您吃得开心，期待下次再为您服务！")),
    "en": (*_BRIEF_EXAMPLES["en"], ("The pizza came fast and still hot. Loved it!",
                                    "Thank you so much! So glad you loved it. See you next time!")),
}


@dataclass(frozen=True)
class ReplyVariant:
    """One way of instructing the reply: a system prompt per language, maybe a mood sentence per
    language, maybe example turns per language."""

    system: dict[str, str]
    moods: dict[str, dict[str, str]] | None = None
    examples: dict[str, tuple[tuple[str, str], ...]] | None = None


_ZH_ONLY = {lang: _FITTING["zh"] for lang in REPLY_LANGUAGES}
#: Reply instructions by REPLY_PROMPT variant. EVAL.md compares them.
REPLY_PROMPTS: dict[str, ReplyVariant] = {
    "original": ReplyVariant({lang: _ORIGINAL for lang in REPLY_LANGUAGES}),
    "fitting": ReplyVariant(_ZH_ONLY),
    "mood": ReplyVariant(_ZH_ONLY, {lang: _MOOD["zh"] for lang in REPLY_LANGUAGES}),
    "examples": ReplyVariant(_FITTING, None, _EXAMPLES),
    "mood-examples": ReplyVariant(_FITTING, _MOOD, _EXAMPLES),
    "brief": ReplyVariant(_BRIEF, _BRIEF_MOOD, _BRIEF_EXAMPLES),
    "brief-reviews": ReplyVariant(_BRIEF, _BRIEF_MOOD, _BRIEF_REVIEW_EXAMPLES),
}
DEFAULT_REPLY_PROMPT = "mood-examples"
#: The default variant's system prompt with no mood: what benchmarks send to peers that have no classifier.
REPLY_SYSTEM_PROMPT = _FITTING["zh"]


def reply_mood(label_set: str, label: str | None, confidence: float | None) -> str:
    """The mood a reply is written in: the sentiment's polarity when the classifier is sure of it."""
    words = LABEL_SETS.get(label_set, ())
    if label not in words or confidence is None or confidence < MOOD_CONFIDENCE:
        return "neutral"
    return ("positive", "negative", "neutral")[words.index(label)]


def reply_language(text: str) -> str:
    """The language a reply prompt is written in for ``text``: "zh" when ideographs are at least 30%
    of its letters, else "en"."""
    ideographs = sum("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    return "zh" if letters and ideographs >= 0.3 * letters else "en"


def reply_prefix_messages(mood: str = "neutral", lang: str = "zh",
                          variant: str = DEFAULT_REPLY_PROMPT) -> list[dict[str, str]]:
    """The fixed start of every reply prompt: the system message, and the example turns if the variant
    has them (cached once per mood and language, so they cost a job no prefill)."""
    chosen = REPLY_PROMPTS[variant]
    system = chosen.system[lang] + (chosen.moods[lang][mood] if chosen.moods else "")
    messages = [{"role": "system", "content": system}]
    for user, assistant in chosen.examples[lang] if chosen.examples else ():
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def classifier_prompt(label_set: str, variant: str = DEFAULT_CLASSIFIER_PROMPT) -> str:
    words = dict(zip(("positive", "negative", "neutral"), LABEL_SETS[label_set]))
    return CLASSIFIER_PROMPTS[variant][label_set].format(**words)
