"""What the engine takes and gives back: plain dataclasses, converted to protocol records at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SentimentResult:
    label: str
    #: Probability of ``label`` among the label words (softmax over their scores).
    confidence: float
    #: Probability of every label word, in label-set order.
    probabilities: dict[str, float]
    prompt_tokens: int


@dataclass(frozen=True)
class ReplyResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    #: The deadline stopped generation before EOS or max_new_tokens.
    truncated: bool
    #: Earlier turns that fit the history budget and were used.
    history_turns_used: int


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
