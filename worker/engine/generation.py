"""Batched decoding: the replies of several jobs advance together, one token per step.

Decoding on a CPU is bound by reading the weights, so a step for eight
sequences costs little more than a step for one. Each reply is prefilled on
its own (prefill is arithmetic-bound, and a single row keeps its peak memory
small); the per-row key/value caches are then left-padded to a common length
and stacked, and the decode loop runs them as one batch. Every row keeps its
own budget (max/min new tokens), temperature and deadline; a row that is done
leaves the batch at once, so it neither costs a step nor produces output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper


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


def stack_caches(caches: list[DynamicCache]) -> tuple[DynamicCache, torch.Tensor]:
    """Left-pad single-row caches to the longest and stack them; return it and its attention mask.

    The padding slots hold zeros and are masked out, so each row attends to
    exactly its own tokens, at the positions they were computed at. The input
    caches are emptied layer by layer as they are copied, so the batch never
    holds its key/value cache twice.
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest = max(lengths)
    mask = torch.zeros(len(caches), longest, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, longest - length:] = 1
    stacked = DynamicCache()
    for index in range(len(caches[0].layers)):
        layers = [cache.layers[index] for cache in caches]
        keys = torch.cat([F.pad(layer.keys, (0, 0, longest - n, 0)) for layer, n in zip(layers, lengths)])
        values = torch.cat([F.pad(layer.values, (0, 0, longest - n, 0)) for layer, n in zip(layers, lengths)])
        for layer in layers:
            layer.keys = layer.values = None
        stacked.update(keys, values, index)
    return stacked, mask


def decode(
    model,
    first_logits: torch.Tensor,
    cache: DynamicCache,
    mask: torch.Tensor,
    rows: list[DecodeRow],
    sampler: Sampler,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Generate every row to its end, filling ``row.tokens``, ``row.ended`` and ``row.truncated``.

    ``first_logits`` (rows x vocabulary) are the prefill's last-position logits;
    ``cache`` and ``mask`` come from ``stack_caches``. ``on_step`` is called
    after every step, for partial replies.
    """
    active = list(range(len(rows)))  # row indexes still in the batch, in batch order
    positions = mask.sum(dim=1)  # each row's next position: its real length so far
    logits = first_logits
    while True:
        tokens = sampler.choose(logits, [rows[i] for i in active])
        now = time.time()
        keep = []
        for j, i in enumerate(active):
            row, token = rows[i], int(tokens[j])
            if token in sampler.stop_token_ids:
                row.ended = True
            else:
                row.tokens.append(token)
                if not row.done and now >= row.deadline:
                    row.truncated = True
            if not row.done:
                keep.append(j)
        if on_step is not None:
            on_step()
        if not keep:
            return
        if len(keep) < len(active):
            # A finished row leaves the batch: it costs no more steps.
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                    past_key_values=cache, use_cache=True)
        positions = positions + 1
        logits = out.logits[:, -1]


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Key/value cache bytes one token of one row holds, across every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
