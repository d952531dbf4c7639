"""QwenEngine: one chat model doing the service's two jobs, over any ``SequenceModel``.

The orchestration is engine-neutral and imports no torch: prompts come from
``ChatFormat``, the compute from a ``SequenceModel`` (the lean torch decoder,
torch_model.py, or llama.cpp, llama_model.py). Plain dataclasses go out; the
task converts them to protocol records.

- prompt prefixes: the key/value cache of each fixed prefix (the classifier
  instructions, the chat system prompt) is computed once at load and copied
  into every job's sequence, so a job only prefills its own text;
- the sentiment is decided by the scores of the label words' first tokens
  only, from one pass;
- a model whose key/value cache has a fixed size (llama.cpp) runs a batch
  that does not fit it in waves that do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from jobqueue.labels import LABEL_SETS
from worker.engine.adapter import ADAPTER_NEEDS_TORCH, ClassifierAdapter, check_fits
from worker.engine.adapter import SETTING as ADAPTER_SETTING
from worker.engine.chat import ChatFormat, HFTokenizer
from worker.engine.generation import ReplyControls, Sampler
from worker.engine.interface import PassOutput, Replies, SequenceModel, Sequences
from worker.engine.prefixes import Prefixes, PrefixSpec, PromptPrefix
from worker.engine.results import EngineInfo, ReplyRequest, ReplyResult, SentimentResult
from worker.engine.chunked_sentiment import ChunkedSentiment
from worker.engine.session import ReplySession, run_to_end
from worker.engine.model_source import ModelLoadError, ModelSource
from worker.engine.prompts import (
    CLASSIFIER_PROMPTS,
    DEFAULT_CLASSIFIER_PROMPT,
    DEFAULT_POSITIVE_THRESHOLD,
    DEFAULT_REPLY_PROMPT,
    MOODS,
    REPLY_LANGUAGES,
    REPLY_PROMPTS,
    reply_language,
    reply_prefix_messages,
)


class QwenEngine:
    def __init__(self, model: SequenceModel, chat: ChatFormat, model_id: str, dtype_name: str, sampler: Sampler, *,
                 prompt_variant: str = DEFAULT_CLASSIFIER_PROMPT,
                 reply_variant: str = DEFAULT_REPLY_PROMPT,
                 positive_threshold: float = DEFAULT_POSITIVE_THRESHOLD,
                 adapter: ClassifierAdapter | None = None):
        if prompt_variant not in CLASSIFIER_PROMPTS:
            raise ModelLoadError(f"CLASSIFIER_PROMPT={prompt_variant!r} is not one of {sorted(CLASSIFIER_PROMPTS)}")
        if reply_variant not in REPLY_PROMPTS:
            raise ModelLoadError(f"REPLY_PROMPT={reply_variant!r} is not one of {sorted(REPLY_PROMPTS)}")
        self.model = model
        self.chat = chat
        self.model_id = model_id
        self.dtype_name = dtype_name
        self.sampler = sampler
        self.prompt_variant = prompt_variant
        self.reply_variant = reply_variant
        #: Two-class sets answer positive when its probability is at least this.
        self.positive_threshold = positive_threshold
        self.unavailable_label_sets = chat.unavailable_label_sets
        classifier, _ = self.prefix_systems(chat, prompt_variant, reply_variant)
        systems = dict(zip(LABEL_SETS, classifier))
        #: The classifier adapter (CLASSIFIER_ADAPTER) of one label set, checked against this model.
        self.adapter = adapter
        if adapter is not None:
            self._check_adapter(adapter, systems)
        #: A readout adapter's product with a pass's final hidden states, as this model computes it.
        self._readout = (model.prepare_readout(adapter.readout()[0])
                         if adapter is not None and not adapter.changes_the_pass else None)
        #: label set -> what decides it: ``prompt:<variant>``, or the adapter trained for that set.
        self.classifiers = {name: f"prompt:{prompt_variant}" for name in LABEL_SETS}
        if adapter is not None:
            self.classifiers[adapter.labels] = adapter.classifier
        #: label set -> the classifier prompt's cached prefix, computed at load (prefixes.py).
        self.classifier_prefixes: Prefixes[str] = Prefixes(
            {name: self._spec(system, self._adapter_for(name)) for name, system in systems.items()},
            self._prefix).build_all()
        #: (mood, language) -> the reply prompt's cached prefix (keys whose prompts are the same share one).
        self.reply_prefixes: Prefixes[tuple[str, str]] = Prefixes(
            {(mood, lang): self._spec(reply_prefix_messages(mood, lang, reply_variant))
             for mood in MOODS for lang in REPLY_LANGUAGES}, self._prefix).build_all()

    @staticmethod
    def prefix_systems(chat: ChatFormat, prompt_variant: str,
                       reply_variant: str = DEFAULT_REPLY_PROMPT
                       ) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
        """The fixed prefixes' messages: the classifier's, one per label set (in LABEL_SETS order), and the
        distinct reply prefixes (one per mood and language, or fewer where they share one)."""
        classifier = [chat.classifier_messages("x", name, prompt_variant)[:1] for name in LABEL_SETS]
        replies = {json.dumps(messages): messages
                   for messages in (reply_prefix_messages(mood, lang, reply_variant)
                                    for mood in MOODS for lang in REPLY_LANGUAGES)}
        return classifier, list(replies.values())

    @classmethod
    def load(cls, source: ModelSource, dtype: str = "float32", threads: int | None = None, *,
             engine: str = "torch", kv_cache_tokens: int = 8192, max_rows: int = 8, **options) -> QwenEngine:
        """Load MODEL on ``engine`` ("torch" or "llama.cpp"); ``options`` (prompt_variant, reply_variant,
        positive_threshold, adapter) go to the constructor, ``controls`` to the sampler. llama.cpp's one context holds ``kv_cache_tokens``
        for up to ``max_rows`` rows at once; the torch engine sizes a cache per batch instead."""
        if engine == "llama.cpp":
            from worker.engine.llama_model import load_llama_engine

            if options.get("adapter") is not None and options["adapter"].changes_the_pass:
                raise ModelLoadError(ADAPTER_NEEDS_TORCH)

            return load_llama_engine(cls, source, threads, kv_cache_tokens, max_rows, **options)
        from worker.engine.memory import release_freed_memory
        from worker.engine.torch_model import load_model

        hf_model, tokenizer = load_model(source, dtype, threads)
        # A folder's embedding table is read through a memory map (mapped.py); a GGUF file's is held.
        weights_folder = None if source.gguf_file else source.folder
        engine = cls.from_model(hf_model, tokenizer, source.model_id, dtype, threads=threads,
                                weights_folder=weights_folder, **options)
        del hf_model  # the last reference to the float32 weights: now they can go back to the OS
        release_freed_memory()
        return engine

    @classmethod
    def from_model(cls, hf_model, tokenizer, model_id: str, dtype: str = "float32", *, threads: int | None = None,
                   weights_folder=None, **options) -> QwenEngine:
        """Wrap a loaded Hugging Face model: its weights move into the lean decoder in ``dtype``."""
        from worker.engine.torch_model import build_sequence_model

        config = hf_model.generation_config
        chat = ChatFormat(HFTokenizer(tokenizer), model_id, config.eos_token_id)
        sampler = Sampler.from_generation_config(config, chat.stop_token_ids, options.pop("controls", ReplyControls()))
        model = build_sequence_model(hf_model, dtype, chat.all_label_token_ids(), threads or 0, weights_folder)
        return cls(model, chat, model_id, dtype, sampler, **options)

    def info(self) -> EngineInfo:
        return self.model.info()

    # --- the sentiment ---

    def classify(self, text: str, label_set: str = "zh", *, use_prefix_cache: bool = True) -> SentimentResult:
        """The sentiment of one text; raises ValueError for a label set this model cannot answer."""
        result = (self.classify_batch([(text, label_set)])[0] if use_prefix_cache
                  else self._classify_uncached(text, label_set))
        if isinstance(result, Exception):
            raise result
        return result

    def classify_batch(self, items: Sequence[tuple[str, str]]) -> list[SentimentResult | ValueError]:
        """Score the label words as the next token after the classifier prompt, for (text, label set) pairs.

        Texts that share a label set share its cached prefix and run in one pass
        (split only to keep a pass within the model's token budget). An item
        whose label set this model cannot answer gets a ValueError in its
        place; the others are unaffected.
        """
        results, groups = self.classifier_prompts(items)
        for label_set, members in groups.items():
            for wave, output in self._sentiment_passes(label_set, members):
                scores = self.label_scores(output, label_set)  # (wave, labels)
                for i, row_scores in zip(wave, scores):
                    index, ids = members[i]
                    results[index] = self.decide(row_scores, label_set, len(ids))
        return results

    def _sentiment_passes(self, label_set: str, members: list[tuple[int, list[int]]]
                          ) -> Iterator[tuple[list[int], PassOutput]]:
        """(indexes into ``members``, the pass's output) for each pass over ``members``' classifier prompts:
        forks of the label set's cached prefix, in waves that fit the model. Read each output before the next."""
        prefix = self.classifier_prefixes[label_set]
        rests = [ids[len(prefix.ids):] for _, ids in members]
        for wave in self._waves([len(rest) for rest in rests]):
            with self._fork(prefix, len(wave), max(len(rests[i]) for i in wave)) as sequences:
                yield wave, sequences.extend([(row, rests[i]) for row, i in enumerate(wave)])

    def classifier_prompts(self, items: Sequence[tuple[str, str]]) -> tuple[
            list[SentimentResult | ValueError | None], dict[str, list[tuple[int, list[int]]]]]:
        """(a result per item: a ValueError for a label set this model cannot answer, else None to fill;
        label set -> (item index, classifier prompt ids) of the items to run)."""
        results: list[SentimentResult | ValueError | None] = [None] * len(items)
        groups: dict[str, list[tuple[int, list[int]]]] = {}
        for index, (text, label_set) in enumerate(items):
            if label_set in self.unavailable_label_sets:
                results[index] = ValueError(self.unavailable_label_sets[label_set])
                continue
            ids = self.chat.encode_chat(self.chat.classifier_messages(text, label_set, self.prompt_variant))
            groups.setdefault(label_set, []).append((index, ids))
        return results, groups

    def classify_in_chunks(self, items: Sequence[tuple[str, str]], chunk_tokens: int,
                           beside: Replies | None = None) -> ChunkedSentiment:
        """``classify_batch``'s answers, read ``chunk_tokens`` of the prompts per ``advance``
        (chunked_sentiment.py): for jobs joining ``beside``, a running session, between its decoding steps."""
        return ChunkedSentiment(self, items, chunk_tokens, beside)

    def _classify_uncached(self, text: str, label_set: str) -> SentimentResult | ValueError:
        """The same decision without the prefix cache: the reference the cache is tested against."""
        if label_set in self.unavailable_label_sets:
            return ValueError(self.unavailable_label_sets[label_set])
        ids = self.chat.encode_chat(self.chat.classifier_messages(text, label_set, self.prompt_variant))
        adapter = self._adapter_for(label_set)
        virtual = 0 if adapter is None else adapter.prefix_tokens
        with _released(self.model.new_sequences(1, virtual + len(ids))) as sequences:
            if adapter is not None and adapter.changes_the_pass:
                sequences.attach(adapter)
            scores = self.label_scores(sequences.extend([(0, ids)]), label_set)  # (1, labels)
        return self.decide(scores[0], label_set, len(ids))

    def label_scores(self, output: PassOutput, label_set: str) -> np.ndarray:
        """(segments, labels) scores of a sentiment pass: the label words' logits, or a readout adapter's
        product with the final hidden states."""
        if self._readout is not None and self.adapter.labels == label_set:
            return self._readout(output) + self.adapter.readout()[1]  # (segments, labels)
        return np.asarray(output.scores(self.chat.label_token_ids[label_set]))

    def classifier_states(self, texts: Sequence[str], label_set: str, rows: int = 16
                          ) -> tuple[np.ndarray, np.ndarray]:
        """((texts, hidden) final hidden states, (texts, labels) label-word scores) of the sentiment pass,
        as a job's pass computes them: what a readout adapter is trained on, and the prompt alone's
        scores beside it (worker/tune.py)."""
        label_ids = self.chat.label_token_ids[label_set]
        states, scores = [], []
        for start in range(0, len(texts), rows):
            _, groups = self.classifier_prompts([(text, label_set) for text in texts[start:start + rows]])
            for _, output in self._sentiment_passes(label_set, groups[label_set]):
                states.append(output.states())                     # (wave, hidden)
                scores.append(np.asarray(output.scores(label_ids)))  # (wave, labels)
        return np.concatenate(states), np.concatenate(scores)

    def decide(self, label_logits, label_set: str, prompt_tokens: int) -> SentimentResult:
        scores = np.asarray(label_logits, dtype=np.float32)            # (labels,)
        exp = np.exp(scores - scores.max())
        probabilities = (exp / exp.sum()).tolist()
        words = LABEL_SETS[label_set]
        if len(words) == 2:
            adapter = self._adapter_for(label_set)
            threshold = self.positive_threshold if adapter is None else adapter.positive_threshold
            best = 0 if probabilities[0] >= threshold else 1
        else:
            best = max(range(len(words)), key=probabilities.__getitem__)
        return SentimentResult(
            label=words[best],
            confidence=probabilities[best],
            probabilities=dict(zip(words, probabilities)),
            prompt_tokens=prompt_tokens,
            classifier=self.classifiers[label_set],
        )

    # --- the reply ---

    def reply(self, text: str, history: list[tuple[str, str]], *, history_max_tokens: int,
              **limits) -> ReplyResult:
        """The empathetic reply to one text; ``limits`` are ReplyRequest's fields."""
        request = ReplyRequest(text=text, history=history, **limits)
        return self.reply_batch([request], history_max_tokens=history_max_tokens)[0]

    def classifier_id(self, label_set: str) -> str:
        return self.classifiers[label_set]

    def reply_batch(
        self,
        requests: Sequence[ReplyRequest],
        *,
        history_max_tokens: int,
        on_step: Callable[[list[list[int]]], Collection[int] | None] | None = None,
    ) -> list[ReplyResult]:
        """Generate the replies together; each stops at EOS, its max_new_tokens or its deadline.

        ``on_step`` gets every request's generated token ids so far after each
        decoding step (``text_of`` turns them into text), for partial replies; it
        may return the indices of requests to stop there (cancelled). Requests
        beyond the model's rows or cache join as earlier ones end.
        """
        results: list[ReplyResult | None] = [None] * len(requests)
        with self.open_replies(max(len(requests), 1), history_max_tokens=history_max_tokens) as session:
            for index, result in run_to_end(session, list(requests), on_step):
                results[index] = result
        return results  # type: ignore[return-value]  # every request ended

    def open_replies(self, rows: int, *, history_max_tokens: int) -> ReplySession:
        """A session of up to ``rows`` replies that join and leave between decoding steps (session.py)."""
        return ReplySession(self, rows, history_max_tokens=history_max_tokens)

    def reply_prefix_for(self, text: str, mood: str) -> PromptPrefix:
        """The cached prefix a reply to ``text`` in ``mood`` starts with."""
        return self.reply_prefixes[mood, reply_language(text)]

    def reply_prompt(self, text: str, history: list[tuple[str, str]], mood: str = "neutral") -> list[int]:
        lang = reply_language(text)
        messages = self.chat.reply_messages(text, history, reply_prefix_messages(mood, lang, self.reply_variant))
        input_ids = self.chat.encode_chat(messages)
        prefix = self.reply_prefix_for(text, mood)
        assert tuple(input_ids[: len(prefix.ids)]) == prefix.ids
        return input_ids

    def text_of(self, tokens: list[int]) -> str:
        return self.chat.text_of(tokens)

    # --- prefixes ---

    def _spec(self, messages: list[dict[str, str]], adapter: ClassifierAdapter | None = None) -> PrefixSpec:
        return PrefixSpec(messages, tuple(self.chat.prefix_ids(messages)), adapter)

    def _prefix(self, spec: PrefixSpec) -> PromptPrefix:
        adapter, ids = spec.adapter, list(spec.ids)
        virtual = 0 if adapter is None else adapter.prefix_tokens
        sequences = self.model.new_sequences(1, virtual + len(ids))
        if adapter is not None and adapter.changes_the_pass:
            sequences.attach(adapter)  # a deep prefix fills cache slots 0..virtual-1
        sequences.extend([(0, ids)])
        return PromptPrefix(spec.ids, sequences, virtual)

    def _adapter_for(self, label_set: str) -> ClassifierAdapter | None:
        return self.adapter if self.adapter is not None and self.adapter.labels == label_set else None

    def _check_adapter(self, adapter: ClassifierAdapter, systems: dict[str, list[dict[str, str]]]) -> None:
        """ModelLoadError naming the first thing ``adapter`` was trained for that this engine is not."""
        if adapter.labels not in systems:
            raise ModelLoadError(f"{ADAPTER_SETTING}={str(adapter.path)!r}: labels {adapter.labels!r} "
                                 f"is not one of {sorted(systems)}")
        # A readout serves either engine, so the tokenizer is identified by how it splits text; the
        # adapters that change the pass are torch-only and keep the vocabulary's hash.
        tokenizer = ({"tokenizer_fingerprint": self.chat.tokenizer_fingerprint()} if not adapter.changes_the_pass
                     else {"tokenizer_sha256": self.chat.tokenizer.vocabulary_sha256()})
        check_fits(adapter, {
            "model": self.model.identity(),
            **tokenizer,
            "label_words": list(LABEL_SETS[adapter.labels]),
            "label_token_ids": self.chat.label_token_ids.get(adapter.labels),
            "classifier_prompt": systems[adapter.labels][0]["content"],
        })
        if not adapter.changes_the_pass and adapter.readout()[0].shape[0] != len(LABEL_SETS[adapter.labels]):
            raise ModelLoadError(f"{ADAPTER_SETTING}={str(adapter.path)!r} does not fit: its readout has "
                                 f"{adapter.readout()[0].shape[0]} rows for {len(LABEL_SETS[adapter.labels])} labels")

    @contextmanager
    def _fork(self, prefix: PromptPrefix, rows: int, extra_tokens: int) -> Iterator[Sequences]:
        """``rows`` sequences that start as copies of ``prefix``, with room for ``extra_tokens`` more each."""
        with _released(self.model.new_sequences(rows, prefix.cache_tokens + extra_tokens)) as sequences:
            for row in range(rows):
                sequences.copy_prefix(prefix.sequences, row)
            yield sequences

    def _waves(self, needs: list[int]) -> list[list[int]]:
        """Indexes of ``needs`` (cache tokens per row) in consecutive groups that fit the model's cache together."""
        limit, rows = self.model.batch_token_limit, self.model.batch_row_limit
        waves: list[list[int]] = []
        used = 0
        for index, need in enumerate(needs):
            if limit is not None and need > limit:
                raise ValueError(f"a job needs {need} key/value cache tokens; this worker holds {limit} "
                                 "(raise KV_TOKENS_PER_JOB)")
            if (not waves or (limit is not None and used + need > limit)
                    or (rows is not None and len(waves[-1]) == rows)):
                waves.append([])
                used = 0
            waves[-1].append(index)
            used += need
        return waves

    # --- prompt building, for tests and benchmarks ---

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.chat.encode_chat(messages, add_generation_prompt)

    def fit_history(self, history: list[tuple[str, str]], max_tokens: int) -> list[tuple[str, str]]:
        return self.chat.fit_history(history, max_tokens)

    @property
    def tokenizer(self):
        return self.chat.tokenizer


@contextmanager
def _released(sequences: Sequences) -> Iterator[Sequences]:
    """Sequences handed back to the model when the block ends (llama.cpp reuses their slots)."""
    try:
        yield sequences
    finally:
        sequences.release()
