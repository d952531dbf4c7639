"""``POST /v1/chat/completions``: OpenAI's chat-completions API over the same queue and workers.

A request becomes one job (``producer.api.openai_chat.chat_job``): the last
user message is its text, the earlier messages its own history. The route
submits it, follows its record with the gateway's shared poller
(``RecordWatcher``), and answers with the final record as a ``chat.completion``,
or with ``stream: true`` as Server-Sent Events of ``chat.completion.chunk``
objects from the partial replies, then ``data: [DONE]``.

Every error has OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for bad input (``param`` names the field), 401 for a missing or
wrong key (``Authorization: Bearer <key>``, or ``X-API-Key``), 429 when the
queue is full and 503 when Redis is unreachable (both with ``Retry-After``). A
job that ends without a reply answers 409 (cancelled), 500 (failed), 503
(expired in the queue, ``Retry-After``) or 504 (timed out); those that must not
be sent again carry ``x-should-retry: false``, which OpenAI's SDKs obey. Once
a stream has started, an error is its last event, ``data: {"error": {...}}``.

A stream whose client goes away cancels its job. The route is left out of
``/openapi.json``: OpenAI's own reference describes it.
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations at run time.
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobqueue.errors import AlreadyFinal, BrokerUnavailable, InvalidRequest, JobNotFound, QueueFull, UnreadableRecord
from jobqueue.protocol import JobRecord, JobStatus
from producer.api.openai_chat import (
    ChatCompletionRequest,
    ChatJob,
    ChatRequestError,
    ChunkWriter,
    chat_job,
    completion,
    request_param,
    validation_param,
)
from producer.api.watch import RecordWatcher, StreamsFull
from producer.client import Client
from producer.settings import ApiSettings

#: Retry-After on a full queue, on an unreachable Redis, on a job that expired in the queue.
QUEUE_FULL_RETRY_AFTER_S = 5
BROKER_DOWN_RETRY_AFTER_S = 2
#: A stream with nothing to send for this long sends an SSE comment, so proxies keep it open.
KEEPALIVE_S = 15.0


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None, retry: bool | None = None):
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
        if retry is not None:  # OpenAI's SDKs retry 409, 429 and 5xx unless told otherwise
            self.headers["x-should-retry"] = "true" if retry else "false"
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def openai_error(err: Exception) -> OpenAIError | None:
    """The OpenAI-shaped error of what a route raised, or None for one it does not know."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return OpenAIError(400, "the body is not valid JSON", code="invalid_json")
        param = validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return OpenAIError(400, f"{param}: {message}" if param else message, param=param)
    if isinstance(err, QueueFull):
        return OpenAIError(429, str(err), kind="rate_limit_error", code="queue_full",
                           retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
    if isinstance(err, BrokerUnavailable):
        return OpenAIError(503, str(err), kind="server_error", code="broker_unavailable",
                           retry_after_s=BROKER_DOWN_RETRY_AFTER_S)
    if isinstance(err, StreamsFull):
        return OpenAIError(503, str(err), kind="server_error", code="too_many_streams",
                           retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
    if isinstance(err, UnreadableRecord):
        return OpenAIError(500, str(err), kind="server_error", code="unreadable_record", retry=False)
    if isinstance(err, StarletteHTTPException):  # 413 for a chunked body over MAX_BODY_BYTES
        return OpenAIError(err.status_code, str(err.detail), code="body_too_large" if err.status_code == 413 else None)
    return None


class OpenAIRoute(APIRoute):
    """A route whose errors, FastAPI's own validation included, all have OpenAI's shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as err:
                problem = openai_error(err)
                if problem is None:
                    raise
                return problem.response()

        return answer


def job_failure(record: JobRecord) -> OpenAIError:
    """The error of a job that ended without a reply."""
    job = f"job {record.job_id}"
    reason = record.error.message if record.error is not None else record.status.value
    if record.status is JobStatus.CANCELLED:
        return OpenAIError(409, f"{job} was cancelled (DELETE /v1/jobs/{record.job_id})", code="cancelled",
                           retry=False)
    if record.status is JobStatus.EXPIRED:
        return OpenAIError(503, f"{job} waited past QUEUE_TIMEOUT_S in the queue: {reason}", kind="server_error",
                           code="expired", retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
    if record.status is JobStatus.TIMED_OUT:
        return OpenAIError(504, f"{job} timed out: {reason}", kind="server_error", code="timed_out", retry=False)
    code = record.error.code.value if record.error is not None else "internal_error"
    return OpenAIError(500, f"{job} failed: {reason}", kind="server_error", code=code, retry=False)


def add_chat_completions(router_owner: Any, client: Client, settings: ApiSettings,
                         tenant_of: Callable[[str | None], str | None]) -> None:
    """Add ``POST /v1/chat/completions`` to an app (or router). ``tenant_of`` is the gateway's rule
    for keys: the caller's tenant, or its 401 error (any exception with ``status == 401``)."""
    router = APIRouter(route_class=OpenAIRoute)
    watcher = RecordWatcher(client, settings.max_event_streams)
    bearer = HTTPBearer(auto_error=False)
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    def caller_tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
                      api_key: Annotated[str | None, Security(api_key_header)]) -> str | None:
        try:
            return tenant_of(credentials.credentials if credentials is not None else api_key)
        except Exception as err:
            if getattr(err, "status", None) != 401:
                raise
            raise OpenAIError(401, "API_KEY or API_KEYS is set: send a key as 'Authorization: Bearer <key>'",
                              code="invalid_api_key") from None

    @router.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(body: ChatCompletionRequest,
                               tenant: Annotated[str | None, Depends(caller_tenant)]) -> Response:
        try:
            job = chat_job(body)
        except ChatRequestError as err:
            raise OpenAIError(400, f"{err.param}: {err}", param=err.param) from None
        await watcher.check_capacity()
        job_id = await run_in_threadpool(_submit, client, job, tenant)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _stream(watcher, client, job_id, settings.events_timeout_s,
                             ChunkWriter(job_id, body.model, include_usage))
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = None
        async for record in _records(watcher, job_id, settings.events_timeout_s):
            final = record
        if final.status is not JobStatus.SUCCEEDED:
            raise job_failure(final)
        return JSONResponse(completion(final, body.model))

    router_owner.include_router(router)


def _submit(client: Client, job: ChatJob, tenant: str | None) -> str:
    try:
        return client.submit(job.text, tenant=tenant, history=job.history, max_new_tokens=job.max_new_tokens,
                             min_new_tokens=job.min_new_tokens, temperature=job.temperature, labels=job.labels)
    except InvalidRequest as err:
        field, problem = err.problems[0] if err.problems else ("request", str(err))
        param = request_param(field, job)
        raise OpenAIError(400, f"{param}: {problem}", param=param) from None


async def _records(watcher: RecordWatcher, job_id: str, timeout_s: float) -> AsyncIterator[JobRecord]:
    """The job's record at each of the watcher's reads, until it is final. OpenAIError when it cannot
    be read, or is not final after ``timeout_s`` (EVENTS_TIMEOUT_S; the job goes on)."""
    deadline = time.monotonic() + timeout_s
    watcher.watch(job_id)
    try:
        while True:
            snapshot = await watcher.next_snapshot()
            if snapshot.error is not None:
                problem = openai_error(snapshot.error) or OpenAIError(500, str(snapshot.error), kind="server_error")
                problem.headers["x-should-retry"] = "false"  # the job was queued: it may still finish
                raise problem
            record = snapshot.records.get(job_id, False)
            if record is None:
                raise OpenAIError(500, f"the record of job {job_id} expired or was removed", kind="server_error",
                                  code="not_found", retry=False)
            if isinstance(record, JobRecord):
                yield record
                if record.status.is_final:
                    return
            elif isinstance(record, UnreadableRecord):
                raise openai_error(record)
            if time.monotonic() >= deadline:
                raise OpenAIError(504, f"job {job_id} is not final after EVENTS_TIMEOUT_S ({timeout_s:g} s); it "
                                       f"goes on: GET /v1/jobs/{job_id}", kind="server_error", code="timeout",
                                  retry=False)
    finally:
        watcher.unwatch(job_id)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(watcher: RecordWatcher, client: Client, job_id: str, timeout_s: float,
                  writer: ChunkWriter) -> AsyncIterator[str]:
    """The job as OpenAI's stream: chunks, then ``[DONE]``; or an error as the last event."""
    ended = False
    last_sent = time.monotonic()
    try:
        async for record in _records(watcher, job_id, timeout_s):
            if record.status.is_final and record.status is not JobStatus.SUCCEEDED:
                raise job_failure(record)
            chunks = writer.chunks(record)
            for chunk in chunks:
                yield _sse(chunk)
            if chunks:
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
        ended = True
        yield "data: [DONE]\n\n"
    except OpenAIError as err:
        ended = True
        yield _sse(err.body())
    finally:
        if not ended:  # the client went away: nobody reads this reply
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(_cancel_quietly, client, job_id)


def _cancel_quietly(client: Client, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except (AlreadyFinal, JobNotFound, BrokerUnavailable):
        pass
