"""The fixed starts of prompts (system message, example turns), cached as key/value entries on first use.

Every job's prompt starts with one of them, so its cache is computed once and
copied into each job's sequence. A prefix is computed the first time a job
needs it, not at load: a worker that never sees an English text never holds the
English prefixes. That matters on llama.cpp, whose one cache is visited cell by
cell at every decoding step, masked or not (a lone reply's step took 2.3 ms
longer with the six reply prefixes than with short ones; BENCHMARKS.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from worker.engine.interface import Sequences

Key = TypeVar("Key")


@dataclass(frozen=True)
class PromptPrefix:
    """A fixed start of a prompt and its one-sequence cache, computed once and only ever copied from."""

    ids: tuple[int, ...]
    sequences: Sequences
    #: Learned key/value entries in front of ``ids`` (a classifier adapter's prefix).
    virtual_tokens: int = 0

    @property
    def cache_tokens(self) -> int:
        return self.virtual_tokens + len(self.ids)


@dataclass(frozen=True)
class PrefixSpec:
    """What a prefix is made of: its messages, their token ids, and a classifier adapter (or None)."""

    messages: list[dict[str, str]]
    ids: tuple[int, ...]
    adapter: Any = None

    @property
    def cache_tokens(self) -> int:
        return (0 if self.adapter is None else self.adapter.prefix_tokens) + len(self.ids)


class Prefixes(Mapping, Generic[Key]):
    """Key -> PromptPrefix, each computed by ``build`` when first asked for; keys whose specs are the
    same share one prefix."""

    def __init__(self, specs: dict[Key, PrefixSpec], build: Callable[[PrefixSpec], PromptPrefix]):
        self._specs = specs
        self._build = build
        self._built: dict[str, PromptPrefix] = {}

    def __getitem__(self, key: Key) -> PromptPrefix:
        spec = self._specs[key]
        shared = json.dumps([spec.messages, id(spec.adapter)])
        if shared not in self._built:
            self._built[shared] = self._build(spec)
        return self._built[shared]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def longest(self) -> int:
        """Cache tokens of the longest prefix, built or not."""
        return max(spec.cache_tokens for spec in self._specs.values())

    def built(self) -> list[PromptPrefix]:
        """The prefixes computed so far."""
        return list(self._built.values())
