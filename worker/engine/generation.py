"""Batched decoding: the replies of several jobs advance together, one token per step.

Decoding on a CPU is bound by reading the weights, so a step for eight
sequences costs little more than a step for one. Each row is its own
sequence with its own cache; a step extends every live row by one token in
one pass. Every row keeps its own budget (max/min new tokens), temperature
and deadline; a row that is done leaves the batch at once, so it neither
costs a step nor produces output. The sampling runs on torch tensors of
logits, whichever engine produced them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

if TYPE_CHECKING:
    from worker.engine.interface import Sequences


@dataclass
class DecodeRow:
    """One reply being generated: its limits going in, its tokens and stop reason coming out."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    #: Epoch seconds; a row still generating at this time stops, truncated.
    deadline: float
    #: The prompt's token ids (the repetition penalty, when the model asks for one, covers them).
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    #: A stop token ended the reply (it is not in ``tokens``).
    ended: bool = False
    #: The deadline stopped the reply before a stop token or ``max_new_tokens``.
    truncated: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.truncated or len(self.tokens) >= self.max_new_tokens


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked, from the model's generation config, the same for every row."""

    stop_token_ids: tuple[int, ...]
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_generation_config(cls, config, stop_token_ids: list[int]) -> Sampler:
        top_k = getattr(config, "top_k", None)
        top_p = getattr(config, "top_p", None)
        penalty = getattr(config, "repetition_penalty", None)
        return cls(
            tuple(stop_token_ids),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=top_p if top_p is not None and top_p < 1.0 else None,
            repetition_penalty=penalty if penalty not in (None, 1.0) else None,
        )

    def choose(self, logits: torch.Tensor, rows: list[DecodeRow]) -> torch.Tensor:
        """One token per row: greedy where the row's temperature is 0, sampled otherwise."""
        logits = logits.float()
        for j, row in enumerate(rows):
            if len(row.tokens) < row.min_new_tokens:
                logits[j, list(self.stop_token_ids)] = float("-inf")
        if self.repetition_penalty is not None:
            logits = RepetitionPenaltyLogitsProcessor(self.repetition_penalty)(_seen_ids(rows), logits)
        chosen = logits.argmax(dim=-1)
        temperatures = torch.tensor([row.temperature for row in rows])
        sampled = temperatures > 0
        if sampled.any():
            scores = logits[sampled] / temperatures[sampled, None]
            if self.top_k is not None:
                scores = TopKLogitsWarper(self.top_k)(None, scores)
            if self.top_p is not None:
                scores = TopPLogitsWarper(self.top_p)(None, scores)
            chosen[sampled] = _sample(torch.softmax(scores, dim=-1))
        return chosen


def _sample(probabilities: torch.Tensor) -> torch.Tensor:
    """One draw per row by inverting the cumulative distribution.

    Exact, and far cheaper than ``torch.multinomial`` over a 152k-word
    vocabulary, which for a batch of rows cost about as much as a decoding step.
    """
    cumulative = probabilities.cumsum(dim=-1)
    draws = torch.rand(len(probabilities), 1) * cumulative[:, -1:]
    # right=True: the first word whose cumulative mass exceeds the draw; words of zero mass never win.
    return torch.searchsorted(cumulative, draws, right=True).clamp_(max=probabilities.shape[-1] - 1)[:, 0]


def _seen_ids(rows: list[DecodeRow]) -> torch.Tensor:
    # Rows differ in length; repeating a row's own first id pads it without penalizing anything new.
    sequences = [row.prompt_ids + row.tokens for row in rows]
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [s[0]] * (longest - len(s)) for s in sequences])


def decode(
    sequences: Sequences,
    first_logits: torch.Tensor,
    rows: list[DecodeRow],
    sampler: Sampler,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Generate every row to its end, filling ``row.tokens``, ``row.ended`` and ``row.truncated``.

    Row ``i`` is sequence ``i`` of ``sequences``, already prefilled;
    ``first_logits`` (rows x vocabulary) are the prefill's last-position logits.
    A finished row is left out of the next pass: it costs no more steps.
    ``on_step`` is called after every step, for partial replies.
    """
    active = list(range(len(rows)))  # rows still generating, in order
    logits = first_logits             # (active, vocabulary)
    while True:
        tokens = sampler.choose(logits, [rows[i] for i in active]).tolist()  # (active,)
        now = time.time()
        kept: list[tuple[int, int]] = []
        for i, token in zip(active, tokens):
            row = rows[i]
            if token in sampler.stop_token_ids:
                row.ended = True
            else:
                row.tokens.append(token)
                if not row.done and now >= row.deadline:
                    row.truncated = True
            if not row.done:
                kept.append((i, token))
        if on_step is not None:
            on_step()
        if not kept:
            return
        active = [i for i, _ in kept]
        logits = sequences.extend([(i, [token]) for i, token in kept]).logits()
