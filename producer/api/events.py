"""A job's changes as Server-Sent Events, made by polling its record in Redis.

The stream carries the same data as ``GET /v1/jobs/{id}``: every event is
derived from the record a poll returned. Events, in the order a job produces them:

- ``status``: ``{"status": "queued"}``; sent first, then on every change.
- ``queue``: ``{"queue_depth": n, "queue_position": p, "eta_s": s}`` while this job waits:
  jobs waiting in the whole queue, this job's place in line (1 = next) and the seconds
  until it starts at the recent service rate (null when no job finished lately); sent
  when any of them changes, read at most once a second.
- ``sentiment``: ``{"label": "正面", "confidence": 0.93}``, as soon as the worker knows it.
- ``reply``: ``{"text": "..."}``, the reply so far, while the job runs (a worker that
  writes its reply only at the end sends none; the reply is then in ``done``).
- ``done``: the final record, exactly as ``GET`` returns it; then the stream closes.
- ``timeout``: ``{"status": ..., "after_s": ...}`` when the job is not final after
  ``EVENTS_TIMEOUT_S``; the stream closes, the job goes on.
- ``error``: ``{"code": "not_found" | "broker_unavailable" | ..., "message": ...}``; the stream closes.

FastAPI adds a ``: ping`` comment every 15 s when nothing else is sent, so
proxies keep the connection open. Records are read for all streams at once
(``producer.api.watch``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.sse import ServerSentEvent

from producer.api.watch import RecordWatcher
from jobqueue.errors import BrokerUnavailable, UnreadableRecord
from jobqueue.protocol import JobRecord, JobStatus, Sentiment


@dataclass
class _Shown:
    """What the client has been sent so far, so that only changes are sent."""

    status: JobStatus | None = None
    sentiment: Sentiment | None = None
    reply: str | None = None
    queue: tuple | None = None  # (depth, position, eta) last sent


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


async def job_events(watcher: RecordWatcher, record: JobRecord, timeout_s: float) -> AsyncIterator[ServerSentEvent]:
    """Events of one job from ``record`` (already read) until it is final, times out or fails."""
    deadline = time.monotonic() + timeout_s
    shown = _Shown()
    job_id = record.job_id
    tenant = record.request.tenant if record.request else None
    watcher.watch(job_id, tenant)
    try:
        while True:
            for event in _changes(shown, record):
                yield event
            if record.status.is_final:
                yield ServerSentEvent(event="done", raw_data=record.to_json())
                return
            if time.monotonic() >= deadline:
                yield _event("timeout", {"status": record.status.value, "after_s": timeout_s})
                return
            snapshot = await watcher.next_snapshot()
            if snapshot.error is not None:
                yield _read_error(snapshot.error)
                return
            if job_id not in snapshot.records:  # watched since after this tick's read began
                continue
            latest = snapshot.records[job_id]
            if isinstance(latest, UnreadableRecord):
                yield _error("unreadable_record", str(latest))
                return
            if latest is None:
                yield _error("not_found", f"the record of job {job_id} expired or was removed")
                return
            record = latest
            queue = (snapshot.queue_depth, record.queue_position, record.eta_s)
            if record.status is JobStatus.QUEUED and snapshot.queue_depth is not None and queue != shown.queue:
                yield _event("queue", {"queue_depth": queue[0], "queue_position": queue[1], "eta_s": queue[2]})
                shown.queue = queue
    finally:
        watcher.unwatch(job_id, tenant)


def _read_error(err: Exception) -> ServerSentEvent:
    if isinstance(err, BrokerUnavailable):
        return _error("broker_unavailable", f"{err}; the job may still finish: read it again later")
    return _error("unreadable_record", f"{type(err).__name__}: {err}")
