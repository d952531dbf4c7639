"""The /v1/jobs routes: submit, read, cancel and follow a job; who may call them (``Access``)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at
# run time, and they name objects local to the functions that add the routes.
import secrets
from collections.abc import AsyncIterable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, StrictBool, create_model, field_validator

from producer.api.events import job_events
from producer.api.problems import ERRORS, IDEMPOTENCY, NOT_FOUND, STREAM_ERRORS, ApiError, ApiProblem, UnreadableBody
from producer.api.quotas import SubmitRate
from producer.api.watch import RecordWatcher
from producer.client import Client
from jobqueue.errors import AlreadyFinal, JobNotFound
from jobqueue.protocol import CONVERSATION_ID_PATTERN, IDEMPOTENCY_KEY_PATTERN, JobOptions, JobRecord, JobStatus, Priority
from producer.settings import ApiSettings, tenant_callback_hosts, tenant_keys


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


class Access:
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


def jobs_router(client: Client, settings: ApiSettings) -> APIRouter:
    """The /v1 routes: submit, read, cancel and follow a job; each route is added by a function that
    is handed what it needs (FastAPI reads each route's signature, so the routes are built per app)."""
    access = Access(client, settings)
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="The caller's key, when the gateway needs one")

    def caller_tenant(key: Annotated[str | None, Security(api_key_header)]) -> str | None:
        return access.tenant_of(key)

    def existing_record(job_id: str, tenant: Annotated[str | None, Depends(caller_tenant)]) -> JobRecord:
        return access.record(job_id, tenant)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller_tenant)], responses=ERRORS)
    _add_submit_route(v1, client, settings, access, caller_tenant)
    _add_record_routes(v1, client, existing_record)
    _add_event_stream_route(v1, client, settings, caller_tenant, existing_record)
    return v1


def _add_submit_route(v1: APIRouter, client: Client, settings: ApiSettings, access: Access,
                      caller_tenant: Callable[..., str | None]) -> None:
    """POST /v1/jobs; its body's schema shows MAX_INPUT_CHARS, and a callback_url only where callbacks
    are allowed."""
    callbacks = bool(settings.allowed_callback_hosts or access.callback_hosts)
    SubmitJob = submit_job_model(settings.max_input_chars, callbacks)  # noqa: N806 (a class, used as the body type)
    submit_rate = SubmitRate(client.store.redis, settings.tenant_submit_rate, settings.tenant_submit_burst)

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
                   idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY,
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


def _add_record_routes(v1: APIRouter, client: Client, existing_record: Callable[..., JobRecord]) -> None:
    """GET and DELETE /v1/jobs/{job_id}: read and cancel a job the caller may see."""

    @v1.get("/jobs/{job_id}", responses=NOT_FOUND)
    def get_job(record: Annotated[JobRecord, Depends(existing_record)]) -> JobRecord:
        """The job's record as it is now: status, sentiment, reply (partial while running), timings."""
        return record

    @v1.delete("/jobs/{job_id}", status_code=202, responses={
        **NOT_FOUND, 409: {"model": JobRecord, "description": "The job had already ended: its final record"}})
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


def _add_event_stream_route(v1: APIRouter, client: Client, settings: ApiSettings,
                            caller_tenant: Callable[..., str | None],
                            existing_record: Callable[..., JobRecord]) -> None:
    """GET /v1/jobs/{job_id}/events, within MAX_EVENT_STREAMS and MAX_EVENT_STREAMS_PER_TENANT."""
    watcher = RecordWatcher(client, settings.max_event_streams, settings.max_event_streams_per_tenant)

    async def stream_capacity(tenant: Annotated[str | None, Depends(caller_tenant)]) -> None:
        await watcher.check_capacity(tenant)

    @v1.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses=STREAM_ERRORS)
    async def job_event_stream(
        record: Annotated[JobRecord, Depends(existing_record)],
        _: Annotated[None, Depends(stream_capacity)],
    ) -> AsyncIterable[ServerSentEvent]:
        """Server-Sent Events: status, queue, sentiment, reply (partial), then done with the final record."""
        async for event in job_events(watcher, record, settings.events_timeout_s):
            yield event
