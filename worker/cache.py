"""The result cache: a sentiment, or a greedy reply, computed once for the same inputs.

Food-delivery reviews repeat ("好吃", "太慢了"), and a sentiment depends on
nothing but the text, the label set, the classifier and the model: the same
inputs give the same answer, so a second pass is wasted work. A reply is
cached only where it is just as determined: greedy (temperature 0) and with
no conversation history. Entries live in Redis for ``CACHE_TTL_S`` (0 turns
the cache off); each lookup is counted, hit or miss, for ``/metrics``.

Entries belong to a tenant (``CACHE_SCOPE=tenant``, the default): a hit, its
``cached`` flag and its speed would otherwise tell tenant B that tenant A sent
the same text within the hour. ``CACHE_SCOPE=global`` shares them, for an
operator whose tenants trust each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis

from jobqueue.protocol import METRICS_CACHE_KEY, Sentiment, cache_key


def digest(*parts: object) -> str:
    """SHA-256 of the inputs that decide a result, in order (JSON, so no two inputs collide)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class CachedReply:
    """A reply as ReplyResult has it, for the fields a record takes (only whole replies are cached)."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    #: Why the reply ended (results.StopReason's value): a reply cut at its token limit is cached too.
    stop_reason: str = "eos"

    @property
    def truncated(self) -> bool:
        return self.stop_reason in ("length", "deadline")


def _decoded(raw: bytes | None, decode):
    """An entry as a result, or None (a miss) for none, or for one another version wrote or that is damaged."""
    if raw is None:
        return None
    try:
        return decode(raw)
    except (ValueError, TypeError):
        return None


class ResultCache:
    def __init__(self, client: redis.Redis, ttl_s: int, scope: str = "tenant"):
        self.client = client
        self.ttl_s = ttl_s
        self.scope = scope

    def digest(self, tenant: str | None, *parts: object) -> str:
        """The entry's key for these inputs, asked on behalf of ``tenant`` (None: no tenant)."""
        return digest(tenant if self.scope == "tenant" else None, *parts)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def sentiments(self, digests: list[str]) -> list[Sentiment | None]:
        """The cached sentiment of each digest (None: a miss); marked ``cached``."""
        return [_decoded(raw, lambda r: Sentiment.model_validate_json(r).model_copy(update={"cached": True}))
                for raw in self._lookup("sentiment", digests)]

    def replies(self, digests: list[str]) -> list[CachedReply | None]:
        return [_decoded(raw, lambda r: CachedReply(**json.loads(r))) for raw in self._lookup("reply", digests)]

    def store_sentiments(self, entries: dict[str, Sentiment]) -> None:
        self._store("sentiment", {d: s.model_dump_json(exclude={"cached"}) for d, s in entries.items()})

    def store_replies(self, entries: dict[str, CachedReply]) -> None:
        self._store("reply", {d: json.dumps({"text": r.text, "prompt_tokens": r.prompt_tokens,
                                             "generated_tokens": r.generated_tokens, "stop_reason": r.stop_reason},
                                            ensure_ascii=False)
                              for d, r in entries.items()})

    def _lookup(self, kind: str, digests: list[str]) -> list[bytes | None]:
        if not self.enabled or not digests:
            return [None] * len(digests)
        found = self.client.mget([cache_key(kind, d) for d in digests])
        hits = sum(raw is not None for raw in found)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(METRICS_CACHE_KEY, f"{kind}_hits", hits)
            pipe.hincrby(METRICS_CACHE_KEY, f"{kind}_misses", len(digests) - hits)
            pipe.execute()
        return found

    def _store(self, kind: str, entries: dict[str, str]) -> None:
        if not self.enabled or not entries:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for d, value in entries.items():
                pipe.set(cache_key(kind, d), value, ex=self.ttl_s)
            pipe.execute()
