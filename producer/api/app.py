"""The HTTP gateway over the producer ``Client``: submit, read, stream, health, metrics, a web page.

Start it with ``uvicorn --factory producer.api:create_app --host 0.0.0.0 --port 8000``.
Settings come from the environment (``ApiSettings``) when the app is built.
Routes are plain ``def`` where they call the (blocking) Redis client, so
FastAPI runs them in its thread pool; the events stream is async and reads
Redis through the same pool.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at
# run time, and they name objects local to create_app.
import importlib.metadata
import importlib.resources
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StrictBool, ValidationError, create_model, field_validator

from producer.api.batches import add_batch_routes
from producer.api.callbacks import CallbackSender
from producer.api.events import job_events
from producer.api.watch import CachedPing, RecordWatcher, StreamsFull, TenantStreamsFull
from producer.api.quotas import RateLimited, SubmitRate
from producer.api.limits import BodyLimit, BodyTooLarge, printable_errors, too_large_response
from producer.api.metrics import build_registry
from producer.api.openai_compat import add_chat_completions
from producer.client import Client
from jobqueue.errors import (AlreadyFinal, BrokerUnavailable, InvalidRequest, JobNotFound, QueueFull, TenantQueueFull,
                             UnreadableRecord)
from jobqueue.protocol import CONVERSATION_ID_PATTERN, IDEMPOTENCY_KEY_PATTERN, JobOptions, JobRecord, JobStatus, Priority
from jobqueue.settings import settings_problems
from producer.settings import ApiSettings, tenant_callback_hosts, tenant_keys

#: Retry-After on a full queue: long enough for a worker to finish a few jobs.
QUEUE_FULL_RETRY_AFTER_S = 5
#: Retry-After when Redis is unreachable: a restart or a network blip.
BROKER_DOWN_RETRY_AFTER_S = 2
#: /healthz waits this long for workers to answer Celery's ping.
HEALTH_PING_TIMEOUT_S = 1.0
#: /healthz answers from a ping at most this old; one ping serves every caller meanwhile.
HEALTH_PING_MAX_AGE_S = 2.0
#: Retry-After when MAX_EVENT_STREAMS streams are open.
STREAMS_FULL_RETRY_AFTER_S = 5


#: At least one character that is neither whitespace nor a control character (those are removed).
VISIBLE_TEXT_PATTERN = r"[^\s\x00-\x1f\x7f]"


class _JsonTypedJobOptions(JobOptions):
    @field_validator("max_new_tokens", "min_new_tokens", "temperature", mode="before")
    @classmethod
    def _json_numbers_only(cls, value: object) -> object:
        # Lax validation would turn "8" or true into numbers; the schema says JSON numbers
        # (8 or 8.0 for an integer, as JSON Schema allows).
        if isinstance(value, (str, bool)):
            raise ValueError("must be a JSON number")
        return value


def submit_job_model(max_input_chars: int, callbacks: bool = False) -> type[JobOptions]:
    """The body of ``POST /v1/jobs``: the text, a conversation, and the protocol's options
    (``JobOptions``: max_new_tokens, min_new_tokens, temperature, labels) with their limits.

    The text's limits are shown in the schema but checked by the Client, after it
    removes control characters, so that every client gets the same rule and message
    (``text: must be at most 2000 characters (got 2001)``).
    """
    text_schema = {"minLength": 1, "maxLength": max_input_chars, "pattern": VISIBLE_TEXT_PATTERN}
    text = Annotated[str, Field(
        description=f"The user's text: not blank, at most {max_input_chars} characters.",
        json_schema_extra=text_schema,
    )]
    conversation_id = Annotated[str, Field(pattern=CONVERSATION_ID_PATTERN)] | None
    # The allowed hosts (operator configuration, and per tenant) are checked by the Client, not shown here.
    callback_url = Annotated[str, Field(max_length=2048, pattern=r"(?i)^https?://\S+$")] | None if callbacks else None
    return create_model(
        "SubmitJob",
        __base__=_JsonTypedJobOptions,
        text=(text, ...),
        conversation_id=(conversation_id, Field(
            None, description="Continue this conversation: its earlier turns are the reply's history.")),
        priority=(Priority, Field("interactive", description=(
            "interactive jobs are served first; bulk jobs wait behind them, for a bounded time"))),
        callback_url=(callback_url, Field(None, description=(
            "POSTed the final record, signed (Standard Webhooks); http(s), its host and port allowed for "
            "the caller by the operator"))),
        callback_on_cancel=(StrictBool, Field(False, description="Also POST it when the job is cancelled")),
    )


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    #: Path of the job's record (also in the Location header).
    location: str
    #: Path of the job's event stream.
    events: str


class UnreadableBody(BaseModel):
    #: FastAPI's answer to a body that is not JSON text at all.
    detail: str


class ApiError(BaseModel):
    code: Literal["unauthorized", "not_found", "queue_full", "broker_unavailable", "unreadable_record",
                  "body_too_large", "too_many_streams"]
    message: str


class Health(BaseModel):
    #: ok: Redis answers and at least one worker answered the ping; otherwise unavailable (503).
    status: Literal["ok", "unavailable"]
    redis: Literal["ok", "unreachable"]
    #: Names of the workers that answered Celery's ping within HEALTH_PING_TIMEOUT_S
    #: (a ping at most HEALTH_PING_MAX_AGE_S old).
    workers: list[str]
    #: Jobs waiting in the queue; null when Redis is unreachable.
    queue_depth: int | None


class ApiProblem(Exception):
    """An error answered with ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(message)


def _problem_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _where(field: str) -> list[str]:
    # The client validates the nested request (options.max_new_tokens); the body is flat. The
    # idempotency key comes in a header.
    return ["header", "Idempotency-Key"] if field == "idempotency_key" else ["body", field.removeprefix("options.")]


def _add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(RequestValidationError)
    async def unvalidated(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, with inputs it could not print as JSON (inf, NaN, lone surrogates) left out.
        return JSONResponse({"detail": printable_errors(list(err.errors()))}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, __: BodyTooLarge) -> JSONResponse:
        return too_large_response(max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Starlette's 405 names the methods of the first route of the path only (GET, where
        # DELETE is a route of its own); Allow lists every method the path takes.
        headers = dict(err.headers or {})
        if err.status_code == 405:
            allowed = {method for route in app.routes if isinstance(route, APIRoute)
                       and route.matches(request.scope)[0] is not Match.NONE for method in route.methods}
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=headers)

    @app.exception_handler(ApiProblem)
    async def problem(_: Request, err: ApiProblem) -> JSONResponse:
        return _problem_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(InvalidRequest)
    async def invalid(_: Request, err: InvalidRequest) -> JSONResponse:
        # The same shape as FastAPI's own 422, so clients read one format.
        detail = [{"type": "invalid_request", "loc": _where(field), "msg": message}
                  for field, message in err.problems]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, err: QueueFull) -> JSONResponse:
        return _problem_response(503, "queue_full", str(err), {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    @app.exception_handler(TenantQueueFull)
    async def tenant_queue_full(_: Request, err: TenantQueueFull) -> JSONResponse:
        return _problem_response(503, "tenant_queue_full", str(err), {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    @app.exception_handler(RateLimited)
    async def rate_limited(_: Request, err: RateLimited) -> JSONResponse:
        return _problem_response(429, "rate_limited", str(err), {"Retry-After": str(err.retry_after_s)})

    @app.exception_handler(TenantStreamsFull)
    async def tenant_streams_full(_: Request, err: TenantStreamsFull) -> JSONResponse:
        return _problem_response(429, "tenant_streams_full", str(err),
                                 {"Retry-After": str(STREAMS_FULL_RETRY_AFTER_S)})

    @app.exception_handler(BrokerUnavailable)
    async def broker_down(_: Request, err: BrokerUnavailable) -> JSONResponse:
        return _problem_response(503, "broker_unavailable", str(err), {"Retry-After": str(BROKER_DOWN_RETRY_AFTER_S)})

    @app.exception_handler(StreamsFull)
    async def streams_full(_: Request, err: StreamsFull) -> JSONResponse:
        return _problem_response(503, "too_many_streams", str(err), {"Retry-After": str(STREAMS_FULL_RETRY_AFTER_S)})

    @app.exception_handler(UnreadableRecord)
    async def unreadable(_: Request, err: UnreadableRecord) -> JSONResponse:
        return _problem_response(500, "unreadable_record", str(err))


_UNAUTHORIZED = "The gateway needs a key, and the X-API-Key header is missing or wrong"
_BROKER_DOWN = "Redis is unreachable (broker_unavailable); Retry-After says when to retry"
_UNKNOWN_JOB = "Unknown job id, or its record expired"
_ERRORS = {401: {"model": ApiError, "description": _UNAUTHORIZED}, 503: {"model": ApiError, "description": _BROKER_DOWN}}
_NOT_FOUND = {404: {"model": ApiError, "description": _UNKNOWN_JOB}}
_IDEMPOTENCY = ("Retried while the first job's record is kept, the same key answers the first submit's job, and queues no other; "
                "the same key with another body is refused (422). 1 to 255 printable ASCII characters")


def _json_error(description: str) -> dict:
    # FastAPI documents a `model` in the route's own media type; the event stream's
    # errors are JSON, so they are spelled out.
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}}


_STREAM_ERRORS = {401: _json_error(_UNAUTHORIZED), 404: _json_error(_UNKNOWN_JOB),
                  429: _json_error("The tenant has as many streams open as it may (tenant_streams_full); "
                                   "Retry-After says when to retry"),
                  503: _json_error(_BROKER_DOWN + "; or too many streams are open (too_many_streams)")}


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or _settings_from_environment()
    client = Client(settings=settings)
    sender = CallbackSender.from_settings(client, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if sender is not None:
            sender.start()
        yield
        if sender is not None:
            await sender.stop()
        client.close()

    app = FastAPI(
        title="qwen-allinone",
        version=importlib.metadata.version("qwen-allinone"),
        description="Sentiment (正面/负面) and an empathetic reply from one small Qwen model, through a queue.",
        lifespan=lifespan,
    )
    _add_error_handlers(app, settings.max_body_bytes)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       path_limits={"/v1/batches": settings.max_batch_body_bytes})
    app.include_router(_jobs_router(client, settings))
    add_batch_routes(app, client, settings, _Access(client, settings).tenant_of, _JsonTypedJobOptions,
                     VISIBLE_TEXT_PATTERN)
    # OpenAI's chat-completions API over the same queue; the same keys, sent as a Bearer token.
    add_chat_completions(app, client, settings, _Access(client, settings).tenant_of)
    _add_service_routes(app, client)
    return app


def _settings_from_environment() -> ApiSettings:
    """The gateway's settings, or it stops with one line naming each bad variable (never a key's value)."""
    try:
        return ApiSettings()
    except ValidationError as err:
        raise SystemExit(f"qwen-allinone gateway: cannot start: {settings_problems(err)}") from None


class _Access:
    """Who is calling (API_KEY or API_KEYS), and which records that caller may see."""

    def __init__(self, client: Client, settings: ApiSettings):
        self.client = client
        self.tenants = tenant_keys(settings.api_keys) if settings.api_keys is not None else None
        self.single_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        #: Tenants with callback hosts of their own (API_KEYS); others get CALLBACK_ALLOWED_HOSTS.
        self.callback_hosts = tenant_callback_hosts(settings)

    def tenant_of(self, key: str | None) -> str | None:
        """The caller's tenant (API_KEYS), or None for a single-tenant gateway; 401 for a wrong key."""
        if self.tenants is not None:
            # Every key is compared, in constant time: the answer's timing leaks neither a key nor which.
            matches = [tenant for known, tenant in self.tenants.items()
                       if key is not None and secrets.compare_digest(key.encode(), known.encode())]
            if matches:
                return matches[0]
        elif self.single_key is None or (key is not None
                                         and secrets.compare_digest(key.encode(), self.single_key.encode())):
            return None
        raise ApiProblem(401, "unauthorized", "missing or wrong X-API-Key header")

    def record(self, job_id: str, tenant: str | None) -> JobRecord:
        record = self.client.get(job_id)
        # Under API_KEYS a tenant sees only its own jobs: another tenant's is "not found".
        if record is None or (self.tenants is not None
                              and (record.request is None or record.request.tenant != tenant)):
            raise ApiProblem(404, "not_found", f"job {job_id} not found (unknown id, or its record expired)")
        return record


def _jobs_router(client: Client, settings: ApiSettings) -> APIRouter:
    """The /v1 routes: submit, read, cancel and follow a job.

    Longer than 60 lines: the four routes are declared here, next to the dependencies they close
    over (FastAPI reads each route's signature, so they cannot be built apart from those)."""
    access = _Access(client, settings)
    callbacks = bool(settings.allowed_callback_hosts or access.callback_hosts)
    SubmitJob = submit_job_model(settings.max_input_chars, callbacks)  # noqa: N806 (a class, used as the body type)
    watcher = RecordWatcher(client, settings.max_event_streams, settings.max_event_streams_per_tenant)
    submit_rate = SubmitRate(client.store.redis, settings.tenant_submit_rate, settings.tenant_submit_burst)
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="The caller's key, when the gateway needs one")

    def caller_tenant(key: Annotated[str | None, Security(api_key_header)]) -> str | None:
        return access.tenant_of(key)

    def existing_record(job_id: str, tenant: Annotated[str | None, Depends(caller_tenant)]) -> JobRecord:
        return access.record(job_id, tenant)

    async def stream_capacity(tenant: Annotated[str | None, Depends(caller_tenant)]) -> None:
        await watcher.check_capacity(tenant)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller_tenant)], responses=_ERRORS)

    @v1.post(
        "/jobs",
        status_code=202,
        responses={
            400: {"model": UnreadableBody, "description": "The body cannot be parsed (not JSON, or not UTF-8)"},
            413: {"model": ApiError, "description": "The body is too large (body_too_large)"},
            429: {"model": ApiError, "description": "The tenant's submit rate is spent (rate_limited); "
                                                    "Retry-After says when to retry"},
            503: {"model": ApiError, "description": "Queue full (queue_full), the tenant's share of it full "
                                                    "(tenant_queue_full) or Redis unreachable "
                                                    "(broker_unavailable); Retry-After says when to retry"},
        },
    )
    def submit_job(body: SubmitJob, response: Response, tenant: Annotated[str | None, Depends(caller_tenant)],
                   idempotency_key: Annotated[str | None, Header(description=_IDEMPOTENCY,
                                                                      pattern=IDEMPOTENCY_KEY_PATTERN)] = None) -> JobAccepted:
        """Queue a job. Poll its record at `Location`, or follow its events.

        A `conversation_id` belongs to the caller's tenant (its key): another tenant's
        conversation of the same id is a different one; so is an `Idempotency-Key`."""
        submit_rate.spend(tenant)
        job_id = client.submit(
            body.text,
            conversation_id=body.conversation_id,
            tenant=tenant,
            max_new_tokens=body.max_new_tokens,
            min_new_tokens=body.min_new_tokens,
            temperature=body.temperature,
            labels=body.labels,
            priority=body.priority,
            callback_url=body.callback_url,
            callback_on_cancel=body.callback_on_cancel,
            callback_hosts=access.callback_hosts.get(tenant),
            idempotency_key=idempotency_key,
        )
        location = f"/v1/jobs/{job_id}"
        response.headers["Location"] = location
        return JobAccepted(job_id=job_id, status=JobStatus.QUEUED, location=location, events=f"{location}/events")

    @v1.get("/jobs/{job_id}", responses=_NOT_FOUND)
    def get_job(record: Annotated[JobRecord, Depends(existing_record)]) -> JobRecord:
        """The job's record as it is now: status, sentiment, reply (partial while running), timings."""
        return record

    @v1.delete("/jobs/{job_id}", status_code=202, responses={
        **_NOT_FOUND, 409: {"model": JobRecord, "description": "The job had already ended: its final record"}})
    def cancel_job(record: Annotated[JobRecord, Depends(existing_record)]) -> JobRecord:
        """Cancel a job. A queued job ends `cancelled` at once and never runs, not even after a
        redelivery. A running job stops at its worker's next decoding step and ends `cancelled`
        with its partial reply; the answer then still says `running` (follow the job to see it end)."""
        try:
            return client.cancel(record.job_id)
        except AlreadyFinal as err:
            return JSONResponse(err.record.model_dump(mode="json"), status_code=409)
        except JobNotFound as err:  # expired between the read and the cancel
            raise ApiProblem(404, "not_found", str(err)) from None

    @v1.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses=_STREAM_ERRORS)
    async def job_event_stream(
        record: Annotated[JobRecord, Depends(existing_record)],
        _: Annotated[None, Depends(stream_capacity)],
    ) -> AsyncIterable[ServerSentEvent]:
        """Server-Sent Events: status, queue, sentiment, reply (partial), then done with the final record."""
        async for event in job_events(watcher, record, settings.events_timeout_s):
            yield event

    return v1


def _add_service_routes(app: FastAPI, client: Client) -> None:
    """Health, metrics and the web page: no API key needed."""
    registry = build_registry(client)
    ping = CachedPing(lambda: client.ping_workers(timeout=HEALTH_PING_TIMEOUT_S), HEALTH_PING_MAX_AGE_S)
    page = importlib.resources.files("producer.api").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz", responses={503: {"model": Health, "description": "Redis unreachable or no worker answered"}})
    async def healthz(response: Response) -> Health:
        """Redis reachable, workers answering Celery's ping, and the queue depth. No API key needed.

        Never holds a request thread for the ping: the answer comes from a ping at most
        HEALTH_PING_MAX_AGE_S old, and one ping serves every caller waiting on it.
        """
        try:
            depth = await run_in_threadpool(client.queue_depth)
            workers = await ping.workers()
        except BrokerUnavailable:
            response.status_code = 503
            return Health(status="unavailable", redis="unreachable", workers=[], queue_depth=None)
        if not workers:
            response.status_code = 503
        return Health(status="ok" if workers else "unavailable", redis="ok", workers=workers, queue_depth=depth)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # Read from Redis now; BrokerUnavailable becomes a 503 through its handler.
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def web_page() -> HTMLResponse:
        return HTMLResponse(page)
