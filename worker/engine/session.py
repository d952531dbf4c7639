"""Continuous decoding: replies join a running batch between steps and leave it when they end.

A ``ReplySession`` holds a fixed number of cache rows. ``add`` gives a reply a
free row (a copy of the reply prefix) and queues the rest of its prompt;
``step`` picks the next token of every row that has its logits, then runs one
pass that holds a token for each decoding row and, beside them, at most
``prefill_chunk`` prompt tokens of the rows still being prefilled. A long
prompt that joins is so prefilled over several steps, and the rows already
decoding keep getting a token every step instead of waiting for the whole of
it. With nothing decoding, prompts are prefilled as fast as a pass allows.

Every row keeps its own limits, temperature and deadline (``DecodeRow``); a
row that ends leaves at once and its cache row is free for the next reply.
Static batching is this with every reply added before the first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.generation import DecodeRow
from worker.engine.results import ReplyRequest, ReplyResult, StopReason

if TYPE_CHECKING:
    from worker.engine.qwen import QwenEngine

#: Prompt tokens prefilled per step beside decoding rows: a 2,000-character text (about
#: 1,300 tokens) joins over about five steps, each costing the running rows a little.
PREFILL_CHUNK_TOKENS = 256


@dataclass
class _Reply:
    """A reply in the session: its cache row, what is left of its prompt, and its next step."""

    row: int
    decode: DecodeRow
    prompt_tokens: int
    history_turns: int
    #: Reserved cache tokens beyond the prefix: the rest of its prompt plus its max_new_tokens.
    reserved: int
    #: Prompt ids not yet in the cache.
    pending: list[int]
    #: The token to feed at the next pass (the one just chosen).
    feed: int | None = None
    #: The last pass's logits for this reply's next token, (vocabulary,) float32.
    logits: np.ndarray | None = None


class ReplySession:
    """Replies generated together in up to ``rows`` cache rows, which they join and leave between steps."""

    def __init__(self, engine: QwenEngine, rows: int, *, history_max_tokens: int,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS):
        model = engine.model
        self.engine = engine
        self.rows = rows if model.batch_row_limit is None else min(rows, model.batch_row_limit)
        self.history_max_tokens = history_max_tokens
        self.prefill_chunk = prefill_chunk
        #: Cache tokens the replies may hold together beyond the prefix (None: no bound).
        self.token_limit = model.batch_token_limit
        prefix_tokens = engine.reply_prefixes.longest()
        self._sequences = model.new_sequences(self.rows, prefix_tokens)
        self._free = list(range(self.rows))
        self._replies: dict[int, _Reply] = {}  # key -> reply
        self._next_key = 0

    # --- joining and leaving ---

    def add(self, request: ReplyRequest) -> int | None:
        """Start ``request``'s reply; its key, or None while no row (or cache) is free for it.

        ValueError if it could never fit, even in an empty session.
        """
        history = self.engine.chat.fit_history(request.history, self.history_max_tokens)
        prefix = self.engine.reply_prefix_for(request.text, request.mood)
        prompt = self.engine.reply_prompt(request.text, history, request.mood)
        rest = prompt[len(prefix.ids):]
        max_new = request.max_new_tokens
        need = len(rest) + max_new
        if self.token_limit is not None and need > self.token_limit:
            raise ValueError(f"a job needs {need} key/value cache tokens; this worker holds {self.token_limit} "
                             "(raise KV_TOKENS_PER_JOB)")
        if not self._free or (self.token_limit is not None and self.reserved + need > self.token_limit):
            return None
        row = DecodeRow(max_new_tokens=max_new, min_new_tokens=min(request.min_new_tokens, max_new),
                        temperature=request.temperature, deadline=request.deadline, prompt_ids=prompt,
                        copy_index=self.engine.sampler.copy_index(rest))
        row.truncated = request.deadline <= time.time()  # out of time before it began: an empty reply
        cache_row = self._free[0]
        if not row.done:
            # Room for the longest reply so far, no more: the cache holds at most rows x that.
            self._sequences.ensure_capacity(prefix.cache_tokens + need)
            self._sequences.copy_prefix(prefix.sequences, cache_row)
        self._free.pop(0)  # taken only once it is set up: a failed grow leaves the row free
        key, self._next_key = self._next_key, self._next_key + 1
        self._replies[key] = _Reply(cache_row, row, len(prompt), len(history), need, list(rest))
        return key

    def cancel(self, key: int) -> None:
        """The reply leaves at the next step with what it has (stop reason ``cancelled``)."""
        reply = self._replies.get(key)
        if reply is not None and not reply.decode.done:  # one that already ended keeps its reason
            reply.decode.cancelled = True

    def prompt_left(self, key: int) -> int:
        """Prompt tokens of the reply not yet read into its cache row."""
        return len(self._replies[key].pending)

    def tokens(self, key: int) -> list[int]:
        """The reply's generated token ids so far."""
        return self._replies[key].decode.tokens

    @property
    def keys(self) -> list[int]:
        return list(self._replies)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def reserved(self) -> int:
        return sum(reply.reserved for reply in self._replies.values())

    @property
    def free_tokens(self) -> int | None:
        """Cache tokens of ``token_limit`` that no reply holds or has reserved (None: no bound)."""
        return None if self.token_limit is None else self.token_limit - self.reserved

    def __len__(self) -> int:
        return len(self._replies)

    # --- stepping ---

    def step(self) -> list[tuple[int, ReplyResult]]:
        """Choose every ready row's next token, then run one pass; the replies that ended, by key."""
        self._choose()
        ended = self._leave()
        segments, wanting = self._plan()
        if segments:
            output = self._sequences.extend([(self._replies[key].row, ids) for key, ids in segments])
            logits = output.logits([index for index, _ in wanting])              # (wanting, vocabulary)
            for (_, key), row_logits in zip(wanting, logits):
                self._replies[key].logits = row_logits
        return ended

    def _choose(self) -> None:
        """The next token of every reply that has its logits: appended, or its end."""
        ready = [reply for reply in self._replies.values() if reply.logits is not None and not reply.decode.done]
        if not ready:
            return
        # Rows of the last pass's logits, as views: choose reads them row by row, so no copy is made.
        chosen = self.engine.sampler.choose([reply.logits for reply in ready], [reply.decode for reply in ready])
        now = time.time()
        for reply, token in zip(ready, chosen):
            reply.logits = None
            row = reply.decode
            if token in self.engine.sampler.stop_token_ids:
                row.ended = True
                continue
            row.tokens.append(token)
            if not row.done and now >= row.deadline:
                row.truncated = True
            if not row.done:
                reply.feed = token

    def _leave(self) -> list[tuple[int, ReplyResult]]:
        """The replies that are done leave; their cache rows are free again."""
        now = time.time()
        ended = []
        for key, reply in list(self._replies.items()):
            row = reply.decode
            if reply.pending and not row.done and now >= row.deadline:
                row.truncated = True  # its deadline came while its prompt was still being read
            if not row.done:
                continue
            del self._replies[key]
            self._sequences.reset(reply.row)
            self._free.append(reply.row)
            ended.append((key, self._result(reply)))
        return ended

    def _plan(self) -> tuple[list[tuple[int, list[int]]], list[tuple[int, int]]]:
        """This pass's (key, token ids) segments, and (segment index, key) of those whose logits are wanted."""
        segments, wanting = [], []
        for key, reply in self._replies.items():
            if reply.feed is not None:
                wanting.append((len(segments), key))
                segments.append((key, [reply.feed]))
                reply.feed = None
        # Beside decoding rows, a chunk of prompt per step; alone, as much as one pass takes.
        budget = self.prefill_chunk if segments else None
        for key, reply in self._replies.items():
            if not reply.pending or (budget is not None and budget <= 0):
                continue
            take = reply.pending if budget is None else reply.pending[:budget]
            reply.pending = reply.pending[len(take):]
            if budget is not None:
                budget -= len(take)
            if not reply.pending:
                wanting.append((len(segments), key))
            segments.append((key, take))
        return segments, wanting

    def _result(self, reply: _Reply) -> ReplyResult:
        row = reply.decode
        stop = (StopReason.EOS if row.ended else StopReason.DEADLINE if row.truncated
                else StopReason.CANCELLED if row.cancelled else StopReason.LENGTH)
        text = self.engine.text_of(row.tokens)
        cut = stop in (StopReason.LENGTH, StopReason.DEADLINE)
        return ReplyResult(
            text=self.engine.chat.end_at_sentence(text) if cut else text,
            prompt_tokens=reply.prompt_tokens,
            generated_tokens=len(row.tokens) + int(row.ended),
            truncated=cut,
            history_turns_used=reply.history_turns,
            stop_reason=stop,
        )

    def close(self) -> None:
        self._sequences.release()

    def __enter__(self) -> ReplySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_to_end(session: ReplySession, requests: list[ReplyRequest],
               on_step: Callable[[list[list[int]]], Collection[int] | None] | None = None,
               ) -> Iterator[tuple[int, ReplyResult]]:
    """Every request through ``session``, joining as rows free up; (request index, result) as each ends.

    ``on_step`` gets every request's token ids so far after each step and may
    return the indices of requests to cancel.
    """
    waiting = list(range(len(requests)))
    key_of: dict[int, int] = {}                      # request index -> key, while it runs
    tokens: list[list[int]] = [[] for _ in requests]  # the rows' own lists: they grow as they decode
    cancelled: set[int] = set()                      # requests cancelled while they waited for a row
    while waiting or len(session):
        while waiting and (key := session.add(requests[waiting[0]])) is not None:
            index = waiting.pop(0)
            key_of[index], tokens[index] = key, session.tokens(key)
            if index in cancelled:
                session.cancel(key)  # it leaves at the next step, before any pass of its own
        ended = session.step()
        index_of = {key: index for index, key in key_of.items()}
        for key, result in ended:
            del key_of[index_of[key]]
            yield index_of[key], result
        if on_step is not None:
            for index in on_step(tokens) or ():
                if index in key_of:
                    session.cancel(key_of[index])
                elif index in waiting:
                    cancelled.add(index)
