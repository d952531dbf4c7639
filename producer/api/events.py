"""A job's changes as Server-Sent Events, made by polling its record in Redis.

The stream carries the same data as ``GET /v1/jobs/{id}``: every event is
derived from the record a poll returned. Events, in the order a job produces them:

- ``status``: ``{"status": "queued"}``; sent first, then on every change.
- ``queue``: ``{"queue_depth": n}``, jobs waiting in the whole queue, while this one waits.
- ``sentiment``: ``{"label": "正面", "confidence": 0.93}``, as soon as the worker knows it.
- ``reply``: ``{"text": "..."}``, the reply so far, while the job runs (a worker that
  writes its reply only at the end sends none; the reply is then in ``done``).
- ``done``: the final record, exactly as ``GET`` returns it; then the stream closes.
- ``timeout``: ``{"status": ..., "after_s": ...}`` when the job is not final after
  ``EVENTS_TIMEOUT_S``; the stream closes, the job goes on.
- ``error``: ``{"code": "not_found" | "broker_unavailable" | ..., "message": ...}``; the stream closes.

FastAPI adds a ``: ping`` comment every 15 s when nothing else is sent, so
proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from producer.client import Client
from producer.errors import BrokerUnavailable, ProducerError
from producer.protocol import JobRecord, JobStatus, Sentiment

#: Redis is read this often per open stream: fast enough for a reply that grows
#: every ~0.25 s, light enough for hundreds of streams (one GET each).
POLL_INTERVAL_S = 0.15
#: The queue depth (one LLEN) is read at most this often while the job waits.
QUEUE_DEPTH_INTERVAL_S = 1.0


@dataclass
class _Shown:
    """What the client has been sent so far, so that only changes are sent."""

    status: JobStatus | None = None
    sentiment: Sentiment | None = None
    reply: str | None = None
    queue_depth: int | None = None


def _event(name: str, data: dict) -> ServerSentEvent:
    # UTF-8 JSON, like the records: "负面" stays readable on the wire, not "\u8d1f\u9762".
    return ServerSentEvent(event=name, raw_data=json.dumps(data, ensure_ascii=False))


def _changes(shown: _Shown, record: JobRecord) -> list[ServerSentEvent]:
    events = []
    if record.status is not shown.status:
        events.append(_event("status", {"status": record.status.value}))
        shown.status = record.status
    if record.sentiment is not None and record.sentiment != shown.sentiment:
        events.append(_event("sentiment", record.sentiment.model_dump()))
        shown.sentiment = record.sentiment
    # While running, the reply is the partial text; once final it goes out in `done`.
    if record.status is JobStatus.RUNNING and record.reply is not None and record.reply != shown.reply:
        events.append(_event("reply", {"text": record.reply}))
        shown.reply = record.reply
    return events


def _error(code: str, message: str) -> ServerSentEvent:
    return _event("error", {"code": code, "message": message})


async def job_events(client: Client, record: JobRecord, timeout_s: float) -> AsyncIterator[ServerSentEvent]:
    """Events of one job from ``record`` (already read) until it is final, times out or fails."""
    deadline = time.monotonic() + timeout_s
    shown = _Shown()
    next_depth_read = 0.0
    while True:
        for event in _changes(shown, record):
            yield event
        if record.status.is_final:
            yield ServerSentEvent(event="done", raw_data=record.to_json())
            return
        try:
            if record.status is JobStatus.QUEUED and time.monotonic() >= next_depth_read:
                depth = await run_in_threadpool(client.queue_depth)
                next_depth_read = time.monotonic() + QUEUE_DEPTH_INTERVAL_S
                if depth != shown.queue_depth:
                    yield _event("queue", {"queue_depth": depth})
                    shown.queue_depth = depth
            if time.monotonic() >= deadline:
                yield _event("timeout", {"status": record.status.value, "after_s": timeout_s})
                return
            await asyncio.sleep(POLL_INTERVAL_S)
            latest = await run_in_threadpool(client.get, record.job_id)
        except BrokerUnavailable as err:
            yield _error("broker_unavailable", f"{err}; the job may still finish: read it again later")
            return
        except ProducerError as err:  # e.g. a record this version cannot read
            yield _error("unreadable_record", str(err))
            return
        if latest is None:
            yield _error("not_found", f"the record of job {record.job_id} expired or was removed")
            return
        record = latest
