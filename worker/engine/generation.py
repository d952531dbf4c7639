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

import math
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
    #: What the sampler's no-copy rule keeps the reply from parroting: for each (n-1)-gram of the job's
    #: own part of the prompt (its text and history, not the shared prefix), the tokens that follow it
    #: there (``Sampler.copy_index``, built once per row: a scan of 1,000 history tokens at every step
    #: took 0.12 ms a row).
    copy_index: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
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
#: Top-k and top-p when neither the model's generation config nor the settings give them: the values
#: Qwen2 and Qwen2.5 instruct models publish beside their temperature of 0.7. A GGUF file carries no
#: generation config, so without them a sampled reply drew from all 152k words (EVAL.md measures it).
DEFAULT_TOP_K = 20
DEFAULT_TOP_P = 0.8
#: A reply never copies a 4-token run of the job's own text (transformers' encoder_no_repeat_ngram_size).
#: The penalty alone still let a greeting come back word for word ("晚安，明天见～"); 4 was chosen
#: over 3 and 5 by `bench replies --score` (EVAL.md).
DEFAULT_NO_COPY_NGRAM = 4
#: How far below the best score the sampler looks for top-k's words, nearest first (``Sampler._sample``):
#: on the 0.5B model's replies, 3 to 60 words were within 4 of the best, 500 to 43,000 within 16.
TOP_K_REACH = (6.0, 10.0, 16.0)
#: How far past the top-p bound the sampler still looks at words without top-k, in nats.
TOP_P_MARGIN = 10.0

@dataclass(frozen=True)
class ReplyControls:
    """What keeps a reply on track: from looping, parroting its input, or drawing from the tail of
    the distribution (REPETITION_*, NO_*_NGRAM, TOP_K and TOP_P settings; EVAL.md measures them)."""

    #: None: the model's generation config's penalty, else DEFAULT_REPETITION_PENALTY; 1.0 turns it off.
    penalty: float | None = None
    #: The penalty covers this many of the latest tokens, prompt included (0: the whole prompt and reply,
    #: as transformers does).
    window: int = DEFAULT_REPETITION_WINDOW
    #: A token that would repeat an n-gram the reply already holds is never chosen (0: no such rule).
    no_repeat_ngram: int = 0
    #: A token that would copy an n-gram of the job's own text is never chosen (0: no such rule).
    no_copy_ngram: int = DEFAULT_NO_COPY_NGRAM
    #: None: the model's generation config's, else DEFAULT_TOP_K; 0 turns it off.
    top_k: int | None = None
    #: None: the model's generation config's, else DEFAULT_TOP_P; 1.0 turns it off.
    top_p: float | None = None


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
    no_copy_ngram: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng, compare=False, repr=False)

    @classmethod
    def from_generation_config(cls, config, stop_token_ids: list[int], controls: ReplyControls | None = None
                               ) -> Sampler:
        """From a GenerationConfig, or the dict of a generation_config.json; ``controls`` (default: none
        given, the config as it is) override it and fill in what it lacks with the defaults above."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        top_k, top_p = get("top_k"), get("top_p")
        penalty, window, ngram, copy_ngram = get("repetition_penalty"), None, 0, 0
        if controls is not None:
            penalty = controls.penalty or penalty or DEFAULT_REPETITION_PENALTY
            window, ngram = controls.window or None, controls.no_repeat_ngram
            copy_ngram = controls.no_copy_ngram
            top_k = _first_set(controls.top_k, top_k, DEFAULT_TOP_K)
            top_p = _first_set(controls.top_p, top_p, DEFAULT_TOP_P)
        return cls(
            tuple(stop_token_ids),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=top_p if top_p is not None and top_p < 1.0 else None,
            repetition_penalty=penalty if penalty not in (None, 1.0) else None,
            penalty_window=window,
            no_repeat_ngram=ngram,
            no_copy_ngram=copy_ngram,
        )

    def choose(self, logits: np.ndarray | list[np.ndarray], rows: list[DecodeRow]) -> list[int]:
        """One token per row of (rows, vocabulary) logits (or a list of (vocabulary,) rows): greedy where
        the temperature is 0, sampled otherwise."""
        stops = list(self.stop_token_ids)
        chosen = []
        for j, row in enumerate(rows):
            scores = np.asarray(logits[j], dtype=np.float32)          # (vocabulary,)
            banned = self._banned(row)
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

    def _banned(self, row: DecodeRow) -> list[int]:
        """Tokens the n-gram rules forbid next: a repeat of the reply's own n-gram, or a copy of the
        job's text. A stop token is never forbidden (a reply ending as its input ends must still end)."""
        banned = set()
        if self.no_repeat_ngram:
            banned |= _ngram_repeats(row.tokens, self.no_repeat_ngram)
        if self.no_copy_ngram and len(row.tokens) >= self.no_copy_ngram - 1:
            banned |= row.copy_index.get(tuple(row.tokens[len(row.tokens) - self.no_copy_ngram + 1:]), set())
        return sorted(banned.difference(self.stop_token_ids))

    def copy_index(self, source: list[int]) -> dict[tuple[int, ...], set[int]]:
        """``DecodeRow.copy_index`` of a job's own tokens (empty without the no-copy rule)."""
        n, index = self.no_copy_ngram, {}
        for i in range(len(source) - n + 1 if n else 0):
            index.setdefault(tuple(source[i:i + n - 1]), set()).add(source[i + n - 1])
        return index

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

        Only the candidates are worked on, found by comparisons over the vocabulary (a partition of all
        152k scores costs several times as much). Top-k's k best are the k best of any set that holds
        them, so of the words within TOP_K_REACH of the best, when at least k are. Without top-k, a
        word more than ``temperature * log(vocabulary / (1 - top_p))`` below the best has a probability
        under (1 - top_p) / vocabulary, so all such words together hold less than the 1 - top_p that
        top-p cuts; TOP_P_MARGIN more keeps what they hold far below any word's share, so the same
        words survive top-p as over the whole vocabulary. Scaling by a positive temperature keeps the
        order.
        """
        ids = np.arange(len(scores))                                  # (vocabulary,)
        best = scores.max()
        if self.top_k is not None and self.top_k < len(scores):
            for reach in TOP_K_REACH:
                near = np.flatnonzero(scores >= best - reach)         # (near,) ascending
                if len(near) >= self.top_k:
                    ids = near
                    break
            kth = np.partition(scores[ids], -self.top_k)[-self.top_k]
            ids = ids[scores[ids] >= kth]                             # (kept,) ascending; ties at the k-th kept
        elif self.top_p is not None:
            reach = temperature * (math.log(len(scores) / (1 - self.top_p)) + TOP_P_MARGIN)
            ids = np.flatnonzero(scores >= best - reach)              # (candidates,) ascending
        kept = scores[ids] / np.float32(temperature)                  # (kept,)
        weights = np.exp(kept - kept.max())                           # (kept,) unnormalized; 0 where cut
        if self.top_p is not None:
            probabilities = weights / weights.sum()                   # (kept,)
            order = np.argsort(probabilities, kind="stable")          # ascending, as transformers' TopPLogitsWarper
            tail = np.cumsum(probabilities[order]) <= 1 - self.top_p  # the low tail holding at most 1 - top_p
            tail[-1] = False                                          # the most likely word always stays
            weights[order[tail]] = 0.0
        return int(ids[_draw(weights, self.rng.random())])


def _first_set(*values):
    return next(value for value in values if value is not None)


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
    tail = tokens[len(tokens) - n + 1:]
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == tail}
