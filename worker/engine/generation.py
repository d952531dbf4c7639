"""Batched decoding's rows and sampling: the replies of several jobs advance together, one token per step.

Decoding on a CPU is bound by reading the weights, so a step for eight
sequences costs little more than a step for one. Each row is its own
sequence with its own cache; a step extends every live row by one token in
one pass. Every row keeps its own budget (max/min new tokens), temperature
and deadline; a row that is done leaves the batch at once, so it neither
costs a step nor produces output. The sampling runs on NumPy arrays of
logits, whichever engine produced them. The loop that runs the steps, and
lets replies join between them, is ``ReplySession`` (session.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    #: Its job was cancelled: it leaves the batch at the next step.
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.truncated or self.cancelled or len(self.tokens) >= self.max_new_tokens


#: The repetition control when neither the model's generation config nor the settings give one: a
#: penalty over the last 64 tokens, as Ollama's default (1.1). 1.2 was chosen by `eval-replies` on the
#: 0.5B model (EVAL.md): at 1.1 it still echoed reviews and reasoning questions back.
DEFAULT_REPETITION_PENALTY = 1.2
DEFAULT_REPETITION_WINDOW = 64


@dataclass(frozen=True)
class Repetition:
    """What keeps a reply from looping or parroting its input (REPETITION_* settings; EVAL.md measures them)."""

    #: None: the model's generation config's penalty, else DEFAULT_REPETITION_PENALTY; 1.0 turns it off.
    penalty: float | None = None
    #: The penalty covers this many of the latest tokens, prompt included (0: the whole prompt and reply,
    #: as transformers does).
    window: int = DEFAULT_REPETITION_WINDOW
    #: A token that would repeat an n-gram the reply already holds is never chosen (0: no such rule).
    no_repeat_ngram: int = 0


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked, from the model's generation config, the same for every row.

    NumPy on float32 logits, so both engines sample alike and the llama.cpp
    engine needs no torch. The steps follow transformers' logits processors
    (repetition penalty, then top-k and top-p on the temperature-scaled scores).
    """

    stop_token_ids: tuple[int, ...]
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    #: The penalty looks this many tokens back (None: the whole prompt and reply).
    penalty_window: int | None = None
    no_repeat_ngram: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng, compare=False, repr=False)

    @classmethod
    def from_generation_config(cls, config, stop_token_ids: list[int], repetition: Repetition | None = None
                               ) -> Sampler:
        """From a GenerationConfig, or the dict of a generation_config.json; ``repetition`` (default: none
        given) fills in a penalty the config lacks."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        top_k, top_p = get("top_k"), get("top_p")
        penalty, window, ngram = get("repetition_penalty"), None, 0
        if repetition is not None:
            penalty = repetition.penalty or penalty or DEFAULT_REPETITION_PENALTY
            window, ngram = repetition.window or None, repetition.no_repeat_ngram
        return cls(
            tuple(stop_token_ids),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=top_p if top_p is not None and top_p < 1.0 else None,
            repetition_penalty=penalty if penalty not in (None, 1.0) else None,
            penalty_window=window,
            no_repeat_ngram=ngram,
        )

    def choose(self, logits: np.ndarray | list[np.ndarray], rows: list[DecodeRow]) -> list[int]:
        """One token per row of (rows, vocabulary) logits (or a list of (vocabulary,) rows): greedy where
        the temperature is 0, sampled otherwise."""
        stops = list(self.stop_token_ids)
        chosen = []
        for j, row in enumerate(rows):
            scores = np.asarray(logits[j], dtype=np.float32)          # (vocabulary,)
            banned = _ngram_repeats(row.tokens, self.no_repeat_ngram) if self.no_repeat_ngram else ()
            if len(row.tokens) < row.min_new_tokens or self.repetition_penalty is not None or banned:
                scores = scores.copy()  # the caller's logits stay as they were
            if len(row.tokens) < row.min_new_tokens:
                scores[stops] = -np.inf
            if self.repetition_penalty is not None:
                _penalize_repeats(scores, self._penalized(row), self.repetition_penalty)
            if banned:
                scores[list(banned)] = -np.inf
            chosen.append(int(scores.argmax()) if row.temperature <= 0 else self._sample(scores, row.temperature))
        return chosen

    def _penalized(self, row: DecodeRow) -> list[int]:
        """The tokens the repetition penalty covers: the latest ``penalty_window`` of prompt and reply."""
        window = self.penalty_window
        if window is None:
            return row.prompt_ids + row.tokens
        if len(row.tokens) >= window:
            return row.tokens[-window:]
        return row.prompt_ids[len(row.tokens) - window:] + row.tokens

    def _sample(self, scores: np.ndarray, temperature: float) -> int:
        """One draw from softmax(``scores`` / ``temperature``) after top-k and top-p.

        With top-k, one pass over the vocabulary finds the k candidates and the rest works on them
        alone: over all 152k words, scaling, exponentials and masks took 1.1 to 1.6 ms a row per step,
        2 to 5% of a lone reply's decoding step on llama.cpp (BENCHMARKS.md). Scaling by a positive
        temperature keeps the order, so the top k are the same before and after it.
        """
        if self.top_k is not None and self.top_k < len(scores):
            kth = np.partition(scores, -self.top_k)[-self.top_k]
            ids = np.flatnonzero(scores >= kth)                       # (kept,) ascending; ties at the k-th kept
        else:
            ids = np.arange(len(scores))                              # (vocabulary,)
        kept = scores[ids] / np.float32(temperature)                  # (kept,)
        weights = np.exp(kept - kept.max())                           # (kept,) unnormalized; 0 where cut
        if self.top_p is not None:
            probabilities = weights / weights.sum()                   # (kept,)
            order = np.argsort(probabilities, kind="stable")          # ascending, as transformers' TopPLogitsWarper
            tail = np.cumsum(probabilities[order]) <= 1 - self.top_p  # the low tail holding at most 1 - top_p
            tail[-1] = False                                          # the most likely word always stays
            weights[order[tail]] = 0.0
        return int(ids[_draw(weights, self.rng.random())])


def _draw(weights: np.ndarray, u: float, block: int = 1024) -> int:
    """The index whose cumulative weight first exceeds ``u`` times the total (inverse-CDF sampling).

    Exact, and cheap over a 152k-word vocabulary: a cumulative sum over block
    totals, then one within the chosen block (a cumulative sum over all of it
    costs a millisecond per row here, more than the rest of sampling). Only a
    word of positive weight can win.
    """
    totals = np.add.reduceat(weights, np.arange(0, len(weights), block))  # (blocks,)
    cumulative = np.cumsum(totals)                                          # (blocks,)
    target = u * cumulative[-1]
    k = int(np.searchsorted(cumulative, target, side="right"))
    if k >= len(totals):  # u * total rounded up to the total itself
        k = int(np.flatnonzero(totals)[-1])
    inside = np.cumsum(weights[k * block:(k + 1) * block])                 # (block,)
    j = int(np.searchsorted(inside, target - (cumulative[k - 1] if k else 0.0), side="right"))
    if j >= len(inside):  # the block's own sum rounded below its total
        j = int(np.flatnonzero(weights[k * block:(k + 1) * block])[-1])
    return k * block + j


def _penalize_repeats(scores: np.ndarray, seen: list[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, in place: seen words get less likely."""
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    values = scores[ids]
    scores[ids] = np.where(values < 0, values * penalty, values / penalty)


def _ngram_repeats(tokens: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram ``tokens`` already holds (transformers' no_repeat_ngram_size)."""
    if len(tokens) < n:
        return set()
    tail = tuple(tokens[len(tokens) - n + 1:])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == tail}
