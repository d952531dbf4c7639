"""What an engine takes and gives back: plain dataclasses, converted to protocol records at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StopReason(str, Enum):
    """Why a reply ended (one per row, as TGI reports it)."""

    #: The model wrote a stop token.
    EOS = "eos"
    #: It reached its max_new_tokens.
    LENGTH = "length"
    #: Its deadline came first (the reply is ``truncated``).
    DEADLINE = "deadline"
    #: Its job was cancelled (``on_step`` said so); the reply is what was generated until then.
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SentimentResult:
    label: str
    #: Probability of ``label`` among the label words (softmax over their scores).
    confidence: float
    #: Probability of every label word, in label-set order.
    probabilities: dict[str, float]
    prompt_tokens: int
    #: What decided: ``prompt:<variant>`` or ``adapter:<name>@<first 8 of its sha256>``.
    classifier: str = ""


@dataclass(frozen=True)
class ReplyResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    #: The token limit or the deadline cut the reply short (``stop_reason`` says which); such a
    #: reply ends at its last sentence boundary.
    truncated: bool
    #: Earlier turns that fit the history budget and were used.
    history_turns_used: int
    stop_reason: StopReason = StopReason.EOS


@dataclass(frozen=True)
class ReplyRequest:
    """One reply to generate, with its own limits."""

    text: str
    history: list[tuple[str, str]] = field(default_factory=list)
    max_new_tokens: int = 128
    #: Epoch seconds; generation stops here (the reply is then ``truncated``).
    deadline: float = float("inf")
    temperature: float = 0.0
    #: Stop tokens are ignored until this many tokens (benchmarks use it for a fixed length).
    min_new_tokens: int = 0
    #: The mood of the reply prompt (prompts.MOODS): the sentiment just decided, when it is sure.
    mood: str = "neutral"


@dataclass(frozen=True)
class EngineInfo:
    """What an engine reports about itself (benchmarks, logs, the README's memory bound)."""

    #: "torch" or "llama.cpp".
    name: str
    #: How the weights are held: float32, bfloat16, int8, or the GGUF file's type.
    weights: str
    #: Bytes the weights occupy in memory.
    weight_bytes: int
    #: Key/value cache bytes one token of one row holds.
    kv_bytes_per_token: int
    threads: int
    #: A row's numbers never depend on the other rows of its pass: one answer per job,
    #: bit for bit, alone or in a batch (the shared engine suite holds it to that).
    batch_invariant: bool = False
