"""Prompts as token ids: the chat template, the label words' first tokens, the stop tokens.

Engine-neutral (it needs a ``Tokenizer``, not torch), so every engine builds
the same prompts and scores the same label tokens. The torch engine brings a
Hugging Face tokenizer (``HFTokenizer``); the llama.cpp engine its GGUF
vocabulary (llama_vocab.py).

User text is never parsed for control tokens: the chat template is rendered
around placeholders and every message content is tokenized with special tokens
split, so a user who types ``<|im_end|>`` gets those characters, not the token.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Protocol

from jobqueue.labels import LABEL_SETS
from worker.engine.model_source import ModelLoadError
from worker.engine.prompts import classifier_prompt

# A sentence ends at one of these marks (a "." only before a space or the end and not after a digit:
# not in 3.14, nor a list's "2. "),
# with any closing quotes or brackets after it.
_SENTENCE_END = re.compile(r"(?:[。！？!?…；\n]|(?<!\d)\.(?=\s|$))[”’\"'」』）)\]]*")

# Texts whose token ids identify a tokenizer: Chinese, English, digits, spaces, emoji, control-looking text.
_FINGERPRINT_TEXTS = ("送餐太慢了，菜都凉了！", "The staff were patient and fixed it fast.", "  3.14 x 2,000 ",
                      "好吃😋 Great!", "<|im_end|>", "正面", "负面", "中性", "positive", "negative", "neutral")

# Tokens a ChatML message adds around its content: <|im_start|>, role, "\n", <|im_end|>, "\n".
_MESSAGE_OVERHEAD_TOKENS = 5


class Tokenizer(Protocol):
    """What ChatFormat needs of a tokenizer."""

    chat_template: str | None
    eos_token_id: int | None

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat template applied to ``messages``, as text."""

    def encode_template(self, text: str) -> list[int]:
        """Ids of template text: control tokens such as ``<|im_start|>`` are parsed."""

    def encode_text(self, text: str) -> list[int]:
        """Ids of user text: control tokens are plain characters."""

    def decode(self, ids: list[int]) -> str:
        """Text of ids, control tokens left out."""

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None."""


class HFTokenizer:
    """A Hugging Face tokenizer behind the ``Tokenizer`` protocol."""

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.chat_template = tokenizer.chat_template
        self.eos_token_id = tokenizer.eos_token_id

    def render_chat(self, messages, add_generation_prompt):
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_template(self, text):
        return self.hf.encode(text, add_special_tokens=False)

    def encode_text(self, text):
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token):
        found = self.hf.convert_tokens_to_ids(token)
        return None if found is None or found == self.hf.unk_token_id else found

    def vocabulary_sha256(self) -> str:
        """A hash of every (token, id) pair: two tokenizers that split text alike hash alike."""
        vocabulary = json.dumps(sorted(self.hf.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
        return hashlib.sha256(vocabulary.encode("utf-8")).hexdigest()[:16]


class ChatFormat:
    """Builds the token ids of both jobs' prompts with one tokenizer and its chat template."""

    def __init__(self, tokenizer: Tokenizer, model_id: str, eos_token_ids=()):
        if tokenizer.chat_template is None:
            raise ModelLoadError(f"MODEL={model_id!r} has no chat template: a chat model is required")
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.stop_token_ids = _stop_token_ids(tokenizer, eos_token_ids)
        # The first token of each label word, per label set: one forward pass decides.
        # A set whose words share a first token cannot be told apart that way and
        # is unavailable with this tokenizer (jobs asking for it fail, saying so).
        self.label_token_ids: dict[str, list[int]] = {}
        self.unavailable_label_sets: dict[str, str] = {}
        for name, words in LABEL_SETS.items():
            ids = self.first_token_ids(words)
            if len(set(ids)) == len(ids):
                self.label_token_ids[name] = ids
            else:
                self.unavailable_label_sets[name] = (
                    f"labels={name!r} is not available with MODEL={model_id!r}: its words {words} "
                    "share a first token, so one forward pass cannot tell them apart")
        if "zh" not in self.label_token_ids:
            raise ModelLoadError(self.unavailable_label_sets["zh"])

    def tokenizer_fingerprint(self) -> str:
        """A hash of how the tokenizer splits a fixed set of texts and lays out a chat: the same for a
        model folder's tokenizer and its GGUF file's vocabulary (whose padded entries differ)."""
        split = [self.encode_text(text) for text in _FINGERPRINT_TEXTS]
        chat = self.encode_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        return hashlib.sha256(json.dumps([split, chat]).encode()).hexdigest()[:16]

    def first_token_ids(self, words) -> list[int]:
        return [self.encode_text(word)[0] for word in words]

    def all_label_token_ids(self) -> list[int]:
        return sorted({i for ids in self.label_token_ids.values() for i in ids})

    def classifier_messages(self, text: str, label_set: str, variant: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": classifier_prompt(label_set, variant)},
                {"role": "user", "content": text}]

    def reply_messages(self, text: str, history: list[tuple[str, str]],
                       prefix: list[dict[str, str]]) -> list[dict[str, str]]:
        """``prefix`` (the system message, and any example turns), the history, then the text."""
        messages = list(prefix)
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": text})
        return messages

    def prefix_ids(self, prefix: list[dict[str, str]]) -> list[int]:
        """Everything before the content of the user message that follows ``prefix``: the same for every job."""
        ids, starts = self._encode_chat([*prefix, {"role": "user", "content": "x"}], add_generation_prompt=True)
        return ids[: starts[len(prefix)]]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` under the chat template, contents encoded as plain text."""
        return self._encode_chat(messages, add_generation_prompt)[0]

    def _encode_chat(self, messages, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """(ids, where each message's content starts in ids)."""
        marker = f"\ue000{uuid.uuid4().hex}\ue001"
        placeholders = [{"role": m["role"], "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)]
        rendered = self.tokenizer.render_chat(placeholders, add_generation_prompt)
        pieces = rendered.split(marker)
        # pieces: template, "0", template, "1", template, ... — odd positions are message indexes.
        ids: list[int] = []
        content_starts: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2:
                content_starts.append(len(ids))
                ids += self.encode_text(messages[int(piece)]["content"])
            elif piece:
                ids += self.tokenizer.encode_template(piece)
        return ids, content_starts

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_text(text)

    def text_of(self, tokens: list[int]) -> str:
        """Reply text of generated token ids; a character still cut in half is left out."""
        return self.tokenizer.decode(tokens).rstrip("\ufffd").strip()

    @staticmethod
    def end_at_sentence(text: str) -> str:
        """A reply cut by its limit, ended at its last sentence boundary (or, with none, its last whole
        word), so it does not stop mid-sentence; unchanged when it has neither."""
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            return text[: ends[-1].end()].rstrip()
        if " " in text.strip() and not text[-1].isspace():
            return text.rsplit(None, 1)[0].rstrip(" ,;:-")  # Latin text: drop the cut word
        return text

    def fit_history(self, history: list[tuple[str, str]], max_tokens: int) -> list[tuple[str, str]]:
        """The newest turns whose tokens fit ``max_tokens``; older turns are dropped first."""
        kept: list[tuple[str, str]] = []
        used = 0
        for user, assistant in reversed(history):
            cost = len(self.encode_text(user)) + len(self.encode_text(assistant)) + 2 * _MESSAGE_OVERHEAD_TOKENS
            if used + cost > max_tokens:
                break
            kept.append((user, assistant))
            used += cost
        kept.reverse()
        return kept


def _stop_token_ids(tokenizer: Tokenizer, eos_token_ids) -> list[int]:
    ids = []
    for candidate in (eos_token_ids, tokenizer.eos_token_id, tokenizer.token_id("<|im_end|>")):
        for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if isinstance(token_id, int) and token_id >= 0 and token_id not in ids:
                ids.append(token_id)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token")
    return ids
