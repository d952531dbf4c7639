"""QwenEngine: one causal LM and its tokenizer, doing the service's two jobs.

Explicit device and dtype, ``inference_mode`` at the edge, plain dataclasses
out; the task converts them to protocol records.

User text is never parsed for control tokens: the chat template is rendered
around placeholders and every message content is tokenized with special tokens
split, so a user who types ``<|im_end|>`` gets those characters, not the token.

Speed on a CPU comes from three things:

- weights: ``DTYPE=int8`` quantizes the linear layers to int8 (one scale per
  output channel) with dynamic activation scales (PyTorch's
  ``quantize_dynamic``); the MLP down-projections
  are held twice, float32 for the sentiment pass and int8 for decoding the
  reply; see BENCHMARKS.md for the measurements behind this;
- prompt prefixes: the key/value cache of each fixed prefix (the classifier
  instructions, the chat system prompt) is computed once at load and copied
  for every job, so a job only prefills its own text;
- the sentiment never runs the 151,936-word output layer: the last hidden
  state is scored against the label words' rows only, kept in float32 even
  when the rest of the model is quantized.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

# tqdm reads this when first imported; the GGUF conversion's progress bar
# would otherwise land in the worker log, one warning line per update.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from producer.protocol import LABEL_SETS  # noqa: E402
from worker.engine.generation import DecodeRow, Sampler, decode, stack_caches  # noqa: E402
from worker.engine.int8 import DualPrecisionLinear, quantize_int8  # noqa: E402
from worker.engine.results import ReplyRequest, ReplyResult, SentimentResult  # noqa: E402
from worker.model_source import ModelLoadError, ModelSource  # noqa: E402
from worker.prompts import (  # noqa: E402
    CLASSIFIER_PROMPTS,
    DEFAULT_CLASSIFIER_PROMPT,
    DEFAULT_POSITIVE_THRESHOLD,
    REPLY_SYSTEM_PROMPT,
    classifier_prompt,
)

#: DTYPE setting -> dtype the weights are loaded in (int8 is quantized after loading).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
# Tokens a ChatML message adds around its content: <|im_start|>, role, "\n", <|im_end|>, "\n".
_MESSAGE_OVERHEAD_TOKENS = 5
#: At most this many tokens (rows x padded length) per sentiment forward pass: a batch of
#: long texts is split so that its activations stay bounded (see README, "Memory").
SENTIMENT_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class PromptPrefix:
    """A fixed start of a prompt and its key/value cache, computed once and never mutated."""

    ids: tuple[int, ...]
    cache: DynamicCache

    def fork(self) -> DynamicCache:
        # generate() and forward() append to the cache they are given.
        return copy.deepcopy(self.cache)


class QwenEngine:
    def __init__(self, model, tokenizer, model_id: str, device: torch.device, dtype_name: str = "float32",
                 label_rows: dict[int, torch.Tensor] | None = None, *,
                 prompt_variant: str = DEFAULT_CLASSIFIER_PROMPT,
                 positive_threshold: float = DEFAULT_POSITIVE_THRESHOLD):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.dtype_name = dtype_name
        if prompt_variant not in CLASSIFIER_PROMPTS:
            raise ModelLoadError(f"CLASSIFIER_PROMPT={prompt_variant!r} is not one of {sorted(CLASSIFIER_PROMPTS)}")
        self.prompt_variant = prompt_variant
        #: Two-class sets answer positive when its probability is at least this.
        self.positive_threshold = positive_threshold
        self.stop_token_ids = _stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.sampler = Sampler.from_generation_config(model.generation_config, self.stop_token_ids)
        # The first token of each label word, per label set: one forward pass decides.
        # A set whose words share a first token cannot be told apart that way and
        # is unavailable with this tokenizer (jobs asking for it fail, saying so).
        self.label_token_ids = {}
        self.unavailable_label_sets = {}
        for name, words in LABEL_SETS.items():
            ids = first_token_ids(tokenizer, words)
            if len(set(ids)) == len(ids):
                self.label_token_ids[name] = ids
            else:
                self.unavailable_label_sets[name] = (
                    f"labels={name!r} is not available with MODEL={model_id!r}: its words {words} "
                    "share a first token, so one forward pass cannot tell them apart")
        if "zh" not in self.label_token_ids:
            raise ModelLoadError(self.unavailable_label_sets["zh"])
        if label_rows is None:
            label_rows = output_rows(model, sorted({i for ids in self.label_token_ids.values() for i in ids}))
        #: token id -> float32 row of the output layer, for the label words only.
        self.label_rows = label_rows
        self._dual_layers = [m for m in model.modules() if isinstance(m, DualPrecisionLinear)]
        with self.precision(precise=True):
            self.classifier_prefixes = {
                name: self._prefix([{"role": "system", "content": classifier_prompt(name, prompt_variant)}])
                for name in LABEL_SETS
            }
        with self.precision(precise=False):
            self.reply_prefix = self._prefix([{"role": "system", "content": REPLY_SYSTEM_PROMPT}])

    @classmethod
    def load(cls, source: ModelSource, dtype: str = "float32", threads: int | None = None,
             **options) -> QwenEngine:
        """Load MODEL; ``options`` (prompt_variant, positive_threshold) go to the constructor."""
        model, tokenizer = load_model(source, dtype, threads)
        return cls.from_model(model, tokenizer, source.model_id, dtype, **options)

    @classmethod
    def from_model(cls, model, tokenizer, model_id: str, dtype: str = "float32", **options) -> QwenEngine:
        """Wrap a loaded float model; quantize it first when ``dtype`` is int8."""
        label_rows = None
        if dtype == "int8":
            label_ids = sorted({i for words in LABEL_SETS.values() for i in first_token_ids(tokenizer, words)})
            label_rows = output_rows(model, label_ids)  # taken before quantization, in full precision
            quantize_int8(model)
        return cls(model, tokenizer, model_id, torch.device("cpu"), dtype, label_rows, **options)

    # --- the two jobs ---

    def classify(self, text: str, label_set: str = "zh", *, use_prefix_cache: bool = True) -> SentimentResult:
        """The sentiment of one text; raises ValueError for a label set this model cannot answer."""
        if not use_prefix_cache:
            return self._classify_uncached(text, label_set)
        result = self.classify_batch([(text, label_set)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.inference_mode()
    def classify_batch(self, items: list[tuple[str, str]]) -> list[SentimentResult | ValueError]:
        """Score the label words as the next token after the classifier prompt, for (text, label set) pairs.

        Texts that share a label set share its cached prefix and run as one
        forward pass (split only to keep a pass within SENTIMENT_BATCH_TOKENS),
        except under int8: there each text runs alone, because a dynamically
        quantized layer scales its input by the largest activation in the whole
        pass, so a text's label would depend on the other texts in its batch.
        An item whose label set this model cannot answer gets a ValueError in
        its place; the others are unaffected.
        """
        results: list[SentimentResult | ValueError | None] = [None] * len(items)
        groups: dict[str, list[tuple[int, list[int]]]] = {}
        for index, (text, label_set) in enumerate(items):
            if label_set in self.unavailable_label_sets:
                results[index] = ValueError(self.unavailable_label_sets[label_set])
                continue
            ids = self.encode_chat(self._classifier_messages(text, label_set))
            groups.setdefault(label_set, []).append((index, ids))
        for label_set, members in groups.items():
            prefix = self.classifier_prefixes[label_set]
            chunks = ([[member] for member in members] if self.dtype_name == "int8"
                      else _chunks_within(members, SENTIMENT_BATCH_TOKENS, skip=len(prefix.ids)))
            for chunk in chunks:
                rests = [ids[len(prefix.ids):] for _, ids in chunk]
                hidden = self._last_hidden(prefix, rests)
                for (index, ids), row in zip(chunk, hidden):
                    results[index] = self._decide(row, label_set, len(ids))
        return results

    def _last_hidden(self, prefix: PromptPrefix, rests: list[list[int]]) -> torch.Tensor:
        """The last real position's hidden state of each row, after the prefix (rows x hidden)."""
        lengths = [len(rest) for rest in rests]
        # Right padding needs no attention mask: causal attention never lets a
        # real token see the padding after it, and padded outputs are not read.
        padded = torch.tensor([rest + [self.pad_token_id] * (max(lengths) - len(rest)) for rest in rests],
                              device=self.device)
        cache = prefix.fork()
        if len(rests) > 1:
            cache.batch_repeat_interleave(len(rests))
        with self.precision(precise=True):
            out = self.model.base_model(padded, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[torch.arange(len(rests)), torch.tensor(lengths) - 1].float()

    @torch.inference_mode()
    def _classify_uncached(self, text: str, label_set: str) -> SentimentResult:
        """The same decision without the prefix cache: the reference the cache is tested against."""
        if label_set in self.unavailable_label_sets:
            raise ValueError(self.unavailable_label_sets[label_set])
        input_ids = self.encode_chat(self._classifier_messages(text, label_set))
        with self.precision(precise=True):
            out = self.model.base_model(torch.tensor([input_ids], device=self.device))
        return self._decide(out.last_hidden_state[0, -1].float(), label_set, len(input_ids))

    def _classifier_messages(self, text: str, label_set: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": classifier_prompt(label_set, self.prompt_variant)},
                {"role": "user", "content": text}]

    def _decide(self, hidden: torch.Tensor, label_set: str, prompt_tokens: int) -> SentimentResult:
        ids = self.label_token_ids[label_set]
        label_logits = torch.stack([self.label_rows[i] @ hidden for i in ids])
        probabilities = torch.softmax(label_logits, dim=-1).tolist()
        words = LABEL_SETS[label_set]
        if len(words) == 2:
            best = 0 if probabilities[0] >= self.positive_threshold else 1
        else:
            best = max(range(len(words)), key=probabilities.__getitem__)
        return SentimentResult(
            label=words[best],
            confidence=probabilities[best],
            probabilities=dict(zip(words, probabilities)),
            prompt_tokens=prompt_tokens,
        )

    def reply(self, text: str, history: list[tuple[str, str]], *, history_max_tokens: int,
              **limits) -> ReplyResult:
        """The empathetic reply to one text; ``limits`` are ReplyRequest's fields."""
        request = ReplyRequest(text=text, history=history, **limits)
        return self.reply_batch([request], history_max_tokens=history_max_tokens)[0]

    @torch.inference_mode()
    def reply_batch(
        self,
        requests: list[ReplyRequest],
        *,
        history_max_tokens: int,
        on_step: Callable[[list[list[int]]], None] | None = None,
    ) -> list[ReplyResult]:
        """Generate the replies together; each stops at EOS, its max_new_tokens or its deadline.

        ``on_step`` gets every request's generated token ids so far after each
        decoding step (``text_of`` turns them into text), for partial replies.
        """
        kept = [self.fit_history(r.history, history_max_tokens) for r in requests]
        prompts = [self._reply_prompt(r.text, history) for r, history in zip(requests, kept)]
        rows = [DecodeRow(max_new_tokens=r.max_new_tokens, min_new_tokens=min(r.min_new_tokens, r.max_new_tokens),
                          temperature=r.temperature, deadline=r.deadline, prompt_ids=ids)
                for r, ids in zip(requests, prompts)]
        now = time.time()
        for row in rows:
            row.truncated = row.deadline <= now  # out of time before it began: an empty reply
        live = [i for i, row in enumerate(rows) if not row.done]
        if live:
            with self.precision(precise=False):
                caches, logits = [], []
                for i in live:  # prefilled one by one: arithmetic-bound, and the peak memory stays one row's
                    cache = self.reply_prefix.fork()
                    rest = prompts[i][len(self.reply_prefix.ids):]
                    out = self.model(torch.tensor([rest], device=self.device), past_key_values=cache,
                                     use_cache=True, logits_to_keep=1)
                    caches.append(cache)
                    logits.append(out.logits[0, -1])
                cache, mask = stack_caches(caches)
                del caches
                report = None if on_step is None else (lambda: on_step([row.tokens for row in rows]))
                decode(self.model, torch.stack(logits), cache, mask, [rows[i] for i in live], self.sampler, report)
        return [
            ReplyResult(
                text=self.text_of(row.tokens),
                prompt_tokens=len(ids),
                generated_tokens=len(row.tokens) + int(row.ended),
                truncated=row.truncated,
                history_turns_used=len(history),
            )
            for row, ids, history in zip(rows, prompts, kept)
        ]

    def _reply_prompt(self, text: str, history: list[tuple[str, str]]) -> list[int]:
        messages = [{"role": "system", "content": REPLY_SYSTEM_PROMPT}]
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": text})
        input_ids = self.encode_chat(messages)
        assert tuple(input_ids[: len(self.reply_prefix.ids)]) == self.reply_prefix.ids
        return input_ids

    def text_of(self, tokens: list[int]) -> str:
        """Reply text of generated token ids; a character still cut in half is left out."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd").strip()

    @contextlib.contextmanager
    def precision(self, *, precise: bool):
        """Under int8, pick the float32 (sentiment) or int8 (reply) copy of the dual layers."""
        previous = [layer.precise for layer in self._dual_layers]
        for layer in self._dual_layers:
            layer.precise = precise
        try:
            yield
        finally:
            for layer, mode in zip(self._dual_layers, previous):
                layer.precise = mode

    # --- prompt building ---

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` under the chat template, contents encoded as plain text."""
        return self._encode_chat(messages, add_generation_prompt)[0]

    def _encode_chat(self, messages, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """(ids, where each message's content starts in ids)."""
        marker = f"\ue000{uuid.uuid4().hex}\ue001"
        placeholders = [{"role": m["role"], "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)]
        rendered = self.tokenizer.apply_chat_template(
            placeholders, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        pieces = rendered.split(marker)
        # pieces: template, "0", template, "1", template, ... — odd positions are message indexes.
        ids: list[int] = []
        content_starts: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2:
                content_starts.append(len(ids))
                ids += self._encode_text(messages[int(piece)]["content"])
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids, content_starts

    def _prefix(self, system: list[dict[str, str]]) -> PromptPrefix:
        """Cache everything before the first user message's content: it is the same for every job."""
        ids, starts = self._encode_chat([*system, {"role": "user", "content": "x"}], add_generation_prompt=True)
        prefix_ids = ids[: starts[1]]
        with torch.inference_mode():
            cache = DynamicCache()
            self.model.base_model(torch.tensor([prefix_ids], device=self.device), past_key_values=cache, use_cache=True)
        return PromptPrefix(tuple(prefix_ids), cache)

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def fit_history(self, history: list[tuple[str, str]], max_tokens: int) -> list[tuple[str, str]]:
        """The newest turns whose tokens fit ``max_tokens``; older turns are dropped first."""
        kept: list[tuple[str, str]] = []
        used = 0
        for user, assistant in reversed(history):
            cost = len(self._encode_text(user)) + len(self._encode_text(assistant)) + 2 * _MESSAGE_OVERHEAD_TOKENS
            if used + cost > max_tokens:
                break
            kept.append((user, assistant))
            used += cost
        kept.reverse()
        return kept


def load_model(source: ModelSource, dtype: str = "float32", threads: int | None = None):
    """(model, tokenizer) of MODEL in float (int8 is quantized later, by ``QwenEngine.from_model``)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"DTYPE={dtype!r} is not one of {sorted(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    # Progress bars would land in the worker log as warnings.
    transformers_logging.disable_progress_bar()
    device = torch.device("cpu")
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=DTYPES[dtype], **kwargs)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"MODEL={source.model_id!r} could not be loaded: {reason}") from None
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"MODEL={source.model_id!r} has no chat template: a chat model is required")
    model.to(device=device)
    model.eval()
    return model, tokenizer


def _chunks_within(members: list[tuple[int, list[int]]], max_tokens: int, skip: int):
    """Consecutive groups of (index, ids) whose rows x longest row (after ``skip``) fit ``max_tokens``."""
    chunk: list[tuple[int, list[int]]] = []
    longest = 0
    for member in members:
        length = len(member[1]) - skip
        if chunk and max(longest, length) * (len(chunk) + 1) > max_tokens:
            yield chunk
            chunk, longest = [], 0
        chunk.append(member)
        longest = max(longest, length)
    if chunk:
        yield chunk


def first_token_ids(tokenizer, words) -> list[int]:
    return [tokenizer(word, add_special_tokens=False, split_special_tokens=True)["input_ids"][0] for word in words]


def output_rows(model, token_ids: list[int]) -> dict[int, torch.Tensor]:
    weight = model.get_output_embeddings().weight
    return {i: weight[i].detach().float().clone() for i in token_ids}


def _stop_token_ids(tokenizer, model) -> list[int]:
    ids = []
    for candidate in (model.generation_config.eos_token_id, tokenizer.eos_token_id,
                      tokenizer.convert_tokens_to_ids("<|im_end|>")):
        for token_id in candidate if isinstance(candidate, list) else [candidate]:
            if isinstance(token_id, int) and token_id >= 0 and token_id not in ids and token_id != tokenizer.unk_token_id:
                ids.append(token_id)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token")
    return ids
