"""The sentiment of jobs joining a running batch, read a chunk of their prompts at a time.

``QwenEngine.classify_batch`` reads every prompt in one pass. For a job that
joins a batch while it decodes, that pass would stall every running row for
the whole prompt: about 10 s for a 2,000-character text on two cores. Here the
same decision is reached over several ``advance`` calls of at most ``chunk``
prompt tokens each, and the worker runs a decoding step between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.engine.results import SentimentResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    from worker.engine.interface import Sequences
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


class ChunkedSentiment:
    """``classify_batch``'s answers for ``items``, computed ``chunk`` prompt tokens per ``advance``."""

    def __init__(self, engine: QwenEngine, items: Sequence[tuple[str, str]], chunk: int):
        self.engine, self.chunk = engine, chunk
        self.results: list[SentimentResult | ValueError | None]
        self.results, prompts = engine.classifier_prompts(items)
        self._groups: list[_LabelSetGroup] = []
        try:
            for label_set, members in prompts.items():
                prefix = engine.classifier_prefixes[label_set]
                rests = [ids[len(prefix.ids):] for _, ids in members]
                sequences = engine.model.new_sequences(len(members), prefix.cache_tokens + max(map(len, rests)))
                self._groups.append(_LabelSetGroup(label_set, sequences, [(i, len(ids)) for i, ids in members], rests))
                for row in range(len(members)):
                    sequences.copy_prefix(prefix.sequences, row)
        except BaseException:
            self.close()
            raise

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
                if not rest or budget <= 0:
                    continue
                take = rest[:budget]
                group.pending[row] = rest[len(take):]
                budget -= len(take)
                if not group.pending[row]:
                    finishing.append(len(segments))
                segments.append((row, take))
            if not segments:
                continue
            output = group.sequences.extend(segments)
            scores = self.engine.label_scores(output, group.label_set)  # (segments, labels)
            for j in finishing:
                index, prompt_tokens = group.members[segments[j][0]]
                self.results[index] = self.engine.decide(scores[j], group.label_set, prompt_tokens)
        return self.done

    def close(self) -> None:
        for group in self._groups:
            group.sequences.release()
        self._groups = []

    def __enter__(self) -> ChunkedSentiment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
