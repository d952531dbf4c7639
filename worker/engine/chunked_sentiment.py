"""The sentiment of jobs joining a running batch, read a chunk of their prompts at a time.

``QwenEngine.classify_batch`` reads every prompt in one pass. For a job that
joins a batch while it decodes, that pass would stall every running row for
the whole prompt: about 10 s for a 2,000-character text on two cores. Here the
same decision is reached over several ``advance`` calls of at most ``chunk``
prompt tokens each, and the worker runs a decoding step between them.

Beside a running ``ReplySession`` on a model with one fixed pool of cache
cells (llama.cpp), a row starts reading only once the cells its whole prompt
needs are free of the session's reservations; until then it waits while the
session's rows decode and leave. A row gives its cells back as soon as its
label is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.engine.results import SentimentResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    from worker.engine.interface import Replies, Sequences
    from worker.engine.qwen import QwenEngine


@dataclass
class _LabelSetGroup:
    """The items of one label set: sequences forked from its classifier prefix, one row each."""

    label_set: str
    sequences: Sequences
    #: (item index, prompt length) per row.
    members: list[tuple[int, int]]
    #: Prompt ids of each row not yet read.
    pending: list[list[int]]
    #: Cache cells each row holds or has reserved (0: not started, or its label is read).
    holds: list[int]


class ChunkedSentiment:
    """``classify_batch``'s answers for ``items``, computed ``chunk`` prompt tokens per ``advance``.

    ``beside``: the session whose decoding steps run between the chunks; its
    reservations and these rows share the model's cache.
    """

    def __init__(self, engine: QwenEngine, items: Sequence[tuple[str, str]], chunk: int,
                 beside: Replies | None = None):
        self.engine, self.chunk, self.beside = engine, chunk, beside
        self.results: list[SentimentResult | ValueError | None]
        self.results, prompts = engine.classifier_prompts(items)
        self._groups: list[_LabelSetGroup] = []
        try:
            for label_set, members in prompts.items():
                prefix = engine.classifier_prefixes[label_set]
                rests = [ids[len(prefix.ids):] for _, ids in members]
                sequences = engine.model.new_sequences(len(members), prefix.cache_tokens + max(map(len, rests)))
                self._groups.append(_LabelSetGroup(label_set, sequences, [(i, len(ids)) for i, ids in members],
                                                   rests, [0] * len(members)))
                for row in range(len(members)):
                    sequences.copy_prefix(prefix.sequences, row)
        except BaseException:
            self.close()
            raise
        self._refuse_what_never_fits()

    @property
    def done(self) -> bool:
        return all(result is not None for result in self.results)

    def advance(self) -> bool:
        """Read at most ``chunk`` more prompt tokens (one pass per label set touched); True once every
        item has its answer."""
        budget = self.chunk
        for group in self._groups:
            if budget <= 0:
                break
            segments, finishing = [], []
            for row, rest in enumerate(group.pending):
                if not rest or budget <= 0 or not self._holds_or_takes(group, row):
                    continue
                take = rest[:budget]
                group.pending[row] = rest[len(take):]
                budget -= len(take)
                if not group.pending[row]:
                    finishing.append(len(segments))
                segments.append((row, take))
            if segments:
                self._read(group, segments, finishing)
        return self.done

    def _read(self, group: _LabelSetGroup, segments: list[tuple[int, list[int]]], finishing: list[int]) -> None:
        output = group.sequences.extend(segments)
        scores = self.engine.label_scores(output, group.label_set)  # (segments, labels)
        for j in finishing:
            row = segments[j][0]
            index, prompt_tokens = group.members[row]
            self.results[index] = self.engine.decide(scores[j], group.label_set, prompt_tokens)
            group.sequences.reset(row)  # its cells are free for the next row
            group.holds[row] = 0

    # --- sharing a fixed cache with a running session ---

    def _cells_free(self) -> int | None:
        """Cells neither the session nor these rows hold or have reserved (None: no bound)."""
        free = None if self.beside is None else self.beside.free_tokens
        return None if free is None else free - sum(sum(group.holds) for group in self._groups)

    def _holds_or_takes(self, group: _LabelSetGroup, row: int) -> bool:
        """Whether ``row`` may read now: it has its cells, or takes them for its whole prompt."""
        if group.holds[row]:
            return True
        need = len(group.pending[row])
        free = self._cells_free()
        if free is not None and need > free:
            return False  # it waits for the session's rows to leave
        group.holds[row] = need
        return True

    def _refuse_what_never_fits(self) -> None:
        """An item longer than the session's whole cache is an error in its place (it would wait forever)."""
        limit = None if self.beside is None else self.beside.token_limit
        if limit is None:
            return
        for group in self._groups:
            for row, rest in enumerate(group.pending):
                if len(rest) > limit:
                    index, prompt_tokens = group.members[row]
                    self.results[index] = ValueError(
                        f"a job's sentiment needs {len(rest)} key/value cache tokens; this worker holds "
                        f"{limit} (raise KV_TOKENS_PER_JOB)")
                    group.pending[row] = []

    def close(self) -> None:
        for group in self._groups:
            group.sequences.release()
        self._groups = []

    def __enter__(self) -> ChunkedSentiment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
