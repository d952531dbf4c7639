"""The engine boundary: what the worker asks of an engine, and what an engine asks of its model.

Two levels, both with plain values in and out:

- ``Engine`` is what the worker talks to: classify a batch of texts by
  label-word scores in one pass, reply to a batch with per-row limits,
  deadlines and temperature, and turn token ids into text for partial
  replies. ``QwenEngine`` (qwen.py) implements it once, for every model.
- ``SequenceModel`` is the compute under it: sequences with their own
  key/value caches, a prefix evaluated once and copied into a sequence,
  several sequences extended in one pass, and from that pass either the
  scores of chosen token ids only (the label words) or full logits (to sample
  the next token), as NumPy arrays. The torch decoder implements it
  (torch_model.py); so does llama.cpp (llama_model.py: ``llama_batch`` with a
  sequence id per token, ``llama_memory_seq_cp`` for a prefix, logits read
  per output).

Nothing here imports torch, so the worker's parent process and the producer
can name these types.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from worker.engine.results import EngineInfo, ReplyRequest, ReplyResult, SentimentResult

#: (cache row, token ids to append to it).
Segment = tuple[int, list[int]]


@runtime_checkable
class Engine(Protocol):
    model_id: str
    dtype_name: str
    #: label set -> why this model cannot answer it.
    unavailable_label_sets: dict[str, str]

    def classify_batch(self, items: Sequence[tuple[str, str]]) -> list[SentimentResult | ValueError]:
        """(text, label set) pairs -> each one's sentiment, or a ValueError for a set it cannot answer."""

    def classify_in_chunks(self, items: Sequence[tuple[str, str]], chunk_tokens: int,
                           beside: Replies | None = None) -> SentimentInChunks:
        """The same answers as ``classify_batch``, computed ``chunk_tokens`` prompt tokens per ``advance()``,
        sharing the cache with ``beside`` (a running session whose steps run between the chunks)."""

    def reply_batch(self, requests: Sequence[ReplyRequest], *, history_max_tokens: int,
                    on_step: Callable[[list[list[int]]], Collection[int] | None] | None = None,
                    ) -> list[ReplyResult]:
        """Replies generated together; ``on_step`` gets every row's token ids so far after each step,
        and may return the indices of rows to stop there (stop reason ``cancelled``)."""

    def open_replies(self, rows: int, *, history_max_tokens: int) -> Replies:
        """A decoding session of up to ``rows`` replies, which join and leave it between steps."""

    def text_of(self, tokens: list[int]) -> str:
        """Reply text of generated token ids."""

    def classifier_id(self, label_set: str) -> str:
        """What decides the sentiment for ``label_set``: ``prompt:<variant>`` or an adapter's id."""

    def info(self) -> EngineInfo: ...


class Replies(Protocol):
    """A decoding session (session.py's ``ReplySession``): replies join and leave it between steps."""

    #: Cache tokens the replies may hold together, or None for no bound.
    token_limit: int | None

    def add(self, request: ReplyRequest) -> int | None:
        """Start a reply; its key, or None while no row (or cache) is free. ValueError if it never fits."""

    def cancel(self, key: int) -> None: ...

    def step(self) -> list[tuple[int, ReplyResult]]:
        """One pass for every running row; the replies that ended, by key."""

    def tokens(self, key: int) -> list[int]: ...

    @property
    def keys(self) -> list[int]: ...

    @property
    def free_rows(self) -> int: ...

    @property
    def free_tokens(self) -> int | None: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Replies: ...

    def __exit__(self, *exc) -> None: ...


class SentimentInChunks(Protocol):
    """Sentiments computed a chunk of prompt tokens per ``advance`` (chunked_sentiment.py)."""

    #: Per item: its SentimentResult, a ValueError, or None until it is read.
    results: list[SentimentResult | ValueError | None]

    def advance(self) -> bool:
        """Read one more chunk; True once every item has its answer."""

    def close(self) -> None: ...

    def __enter__(self) -> SentimentInChunks: ...

    def __exit__(self, *exc) -> None: ...


class PassOutput(Protocol):
    """What one pass over segments gives: a row per segment, for its last token."""

    def scores(self, token_ids: Sequence[int]) -> Any:
        """(segments, len(token_ids)) float32 NumPy scores of the chosen tokens only."""

    def states(self) -> Any:
        """(segments, hidden) float32 NumPy final hidden states (after the last norm): what a readout
        classifier adapter is trained on."""

    def logits(self, segments: Sequence[int] | None = None) -> Any:
        """(segments, vocabulary) float32 NumPy logits, to pick each segment's next token; of the
        given segment indices only, when given (a chunk of a prompt needs none)."""


class Sequences(Protocol):
    """A batch of sequences, each with its own key/value cache of a fixed capacity."""

    def copy_prefix(self, prefix: Sequences, row: int) -> None:
        """Sequence ``row``, empty, starts as a copy of the one-sequence ``prefix``."""

    def ensure_capacity(self, tokens: int) -> None:
        """Every sequence can hold ``tokens`` tokens (the torch cache grows, keeping what it holds)."""

    def reset(self, row: int) -> None:
        """Sequence ``row`` is empty again; its cache is free for another reply."""

    def extend(self, segments: Sequence[Segment]) -> PassOutput:
        """Append each segment's tokens to its sequence, in one pass."""

    def release(self) -> None:
        """Hand the sequences' cache back to the model; they are not used again."""

    def attach(self, adapter: Any) -> None:
        """This one-sequence prefix, still empty, and every sequence forked from it run with a
        classifier adapter (adapter.py) from now on; engines that cannot raise ModelLoadError."""


class SequenceModel(Protocol):
    #: Sequences one batch may fork at once, or None for no bound.
    batch_row_limit: int | None
    #: Cache tokens that the sequences of one batch may hold together beyond the
    #: prefixes (llama.cpp's context is one fixed pool), or None for no bound.
    batch_token_limit: int | None

    def new_sequences(self, rows: int, capacity: int) -> Sequences:
        """``rows`` empty sequences of ``capacity`` tokens each (``ensure_capacity`` makes room for more)."""

    def info(self) -> EngineInfo: ...

    def prepare_readout(self, weight: Any) -> Callable[[PassOutput], Any]:
        """A function of a pass's output giving (segments, labels) = final hidden states @ ``weight``.T,
        for a readout adapter's (labels, hidden) weight, computed however this model does it cheapest."""

    def identity(self) -> dict[str, Any]:
        """Architecture, sizes and a fingerprint of the weights: what an adapter must have been trained on."""


def split_passes(segments: Sequence[Segment], budget: int) -> Iterator[list[tuple[int, list[int], bool]]]:
    """Groups of (row, tokens, is its segment's last chunk) of at most ``budget`` tokens each, in order.

    A model runs one pass per group, so a long prompt is prefilled in chunks and
    activations stay bounded whatever the batch holds.
    """
    group, used = [], 0
    for row, tokens in segments:
        if not tokens:
            raise ValueError(f"row {row}: a segment needs at least one token")
        while tokens:
            if used == budget:
                yield group
                group, used = [], 0
            take = tokens[: budget - used]
            tokens = tokens[len(take):]
            group.append((row, take, not tokens))
            used += len(take)
    if group:
        yield group
