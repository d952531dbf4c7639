"""The fixed starts of prompts (system message, example turns), cached as key/value entries.

Every job's prompt starts with one of them, so its cache is computed once and
copied into each job's sequence. The engine builds them all at load
(``build_all``): built on first use instead, a worker started in 1.4 s instead
of 12 s, but the first job of each mood and language waited about 1.3 s longer
(its prefix's prefill) and a lone reply's decoding step was no faster
(BENCHMARKS.md, "The llama.cpp engine beside llama-server").
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
    """Key -> PromptPrefix, each computed by ``build`` (by ``build_all``, or when first asked for); keys
    whose specs are the same share one prefix."""

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

    def build_all(self) -> Prefixes[Key]:
        for key in self._specs:
            self[key]
        return self

    def longest(self) -> int:
        """Cache tokens of the longest prefix, built or not."""
        return max(spec.cache_tokens for spec in self._specs.values())

    def built(self) -> list[PromptPrefix]:
        """The prefixes computed so far."""
        return list(self._built.values())
