"""``/v1/batches``: many jobs submitted as one batch, its status, its results, its cancel.

The body is JSON (``texts`` and shared options) or JSON lines (one job a line), both read by
``batch_body``. All or none: every job is validated (the job request's own rules) before any is
queued, and a queue that fills part way cancels the jobs the batch had queued already, so a refused
batch leaves nothing behind. The jobs go to the bulk lane, as the caller's tenant's, through
``Client.submit`` (MAX_QUEUE, MAX_QUEUE_BULK and TENANT_MAX_QUEUE apply to each), once per
``Idempotency-Key`` (``batch_submit``). The batch record is ``jobqueue.batches``'s.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, BeforeValidator, Field, create_model
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from jobqueue.batches import (RESULT_COLUMNS, Batch, BatchClaims, BatchStore, batch_status, job_status,
                              read_records, result_row)
from jobqueue.errors import AlreadyFinal, InvalidRequest, JobNotFound
from jobqueue.protocol import IDEMPOTENCY_KEY_PATTERN, JobOptions, JobStatus
from producer.api.batch_body import (BatchBodyError, Where, check_requests, is_ndjson, line_model, lines_where,
                                     read_lines, texts_where)
from producer.api.batch_submit import LEASE_S, BatchInProgress, BatchSubmitter
from producer.api.quotas import SubmitRate
from producer.client import Client
from producer.settings import ApiSettings


#: Retry-After of a 409 batch_in_progress: the earlier request is queueing the batch's jobs.
IN_PROGRESS_RETRY_AFTER_S = 1
_IDEMPOTENCY = ("Retried while the batch's record is kept, the same key with the same body answers the first "
                "submit's batch and queues no other job, also when the retries race; the same key with another body "
                "is refused (422). 1 to 255 printable ASCII characters")


class BatchAccepted(BaseModel):
    batch_id: str
    status: str
    #: Path of the batch's status (also in the Location header).
    location: str
    #: How many jobs were queued: every text of the body.
    jobs: int


class BatchError(BaseModel):
    code: str
    message: str


_NOT_FOUND = {404: {"model": BatchError, "description": "Unknown batch id, its record expired, or another tenant's"}}
_ERRORS = {401: {"model": BatchError, "description": "The gateway needs a key, and X-API-Key is missing or wrong"},
           503: {"model": BatchError, "description": "Redis is unreachable (broker_unavailable); Retry-After says "
                                                     "when to retry"}}
_SUBMIT_ERRORS = {
    400: {"description": "The body cannot be parsed (not JSON, or not UTF-8)"},
    409: {"model": BatchError, "description": "The batch of this Idempotency-Key is still being queued by an earlier "
                                              "request (batch_in_progress); Retry-After says when to ask again"},
    413: {"model": BatchError, "description": "The body is too large (body_too_large)"},
    429: {"model": BatchError, "description": "The tenant's submit rate is spent (rate_limited)"},
    503: {"model": BatchError, "description": "The queue (queue_full) or the tenant's share (tenant_queue_full) "
                                              "filled part way: nothing of the batch is left; or Redis is "
                                              "unreachable (broker_unavailable). Retry-After says when to retry"},
}
_RESULTS = {200: {"description": "One row per text, in input order",
                  "content": {"application/x-ndjson": {}, "text/csv": {}}},
            409: {"model": BatchError, "description": "The batch is queued or running (batch_not_done)"},
            **_NOT_FOUND}


class BatchStatus(BaseModel):
    batch_id: str
    #: queued, running, succeeded (every job final, whatever its own status), or cancelled.
    status: Literal["queued", "running", "succeeded", "cancelled"]
    created_at: float
    jobs: int
    #: Jobs by their status (queued, running, succeeded, failed, ...; ``missing``: record expired).
    counts: dict[str, int]
    location: str
    results: str


def submit_batch_model(options_base: type[JobOptions], max_items: int, max_input_chars: int,
                       text_pattern: str) -> type[BaseModel]:
    """The body: ``texts`` and the job options every text shares (JobOptions: max_new_tokens,
    min_new_tokens, temperature, labels). No priority (always bulk), conversation or callback.

    As for POST /v1/jobs, a text's limits are shown in the schema but checked (after control
    characters are removed) by the job request's own validation, so the messages are the same."""
    text = Annotated[str, Field(json_schema_extra={"minLength": 1, "maxLength": max_input_chars,
                                                   "pattern": text_pattern})]

    def at_most_max_items(value: object) -> object:
        # Checked before the texts are read, and named: pydantic's own message does not say which limit.
        if isinstance(value, list) and len(value) > max_items:
            raise PydanticCustomError("too_long", "must hold at most {limit} texts (MAX_BATCH_ITEMS), not {n}: "
                                      "split it into batches", {"limit": max_items, "n": len(value)})
        return value

    return create_model(
        "SubmitBatch", __base__=options_base,
        texts=(Annotated[list[text], BeforeValidator(at_most_max_items), Field(
            min_length=1, json_schema_extra={"maxItems": max_items}, description=(
                f"The texts, 1 to {max_items}; each as POST /v1/jobs's text: not blank, "
                f"at most {max_input_chars} characters"))], ...),
    )


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def batch_summary(batch: Batch, client: Client) -> BatchStatus:
    counts = Counter(job_status(record) for _, record in read_records(batch.job_ids, client.get_many))
    location = f"/v1/batches/{batch.batch_id}"
    return BatchStatus(batch_id=batch.batch_id, status=batch_status(batch, counts), created_at=batch.created_at,
                       jobs=len(batch.job_ids), counts=dict(counts), location=location, results=f"{location}/results")


def render_results(batch: Batch, client: Client, fmt: str) -> Response:
    rows = [result_row(index, record)
            for index, (_, record) in enumerate(read_records(batch.job_ids, client.get_many))]
    if fmt == "jsonl":
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return Response(body, media_type="application/x-ndjson")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")


def batch_router(client: Client, settings: ApiSettings, tenant_of: Callable[[str | None], str | None],
                 options_base: type[JobOptions], text_pattern: str) -> APIRouter:
    """The /v1/batches routes; each reads the batch through ``own_batch``: the caller's tenant's only."""
    store = BatchStore(client.store.redis, settings.result_ttl_s)
    multi_tenant = settings.api_keys is not None
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="The caller's key, when the gateway needs one")

    def caller_tenant(key: Annotated[str | None, Security(api_key_header)]) -> str | None:
        return tenant_of(key)

    def own_batch(batch_id: str, tenant: Annotated[str | None, Depends(caller_tenant)]) -> Batch:
        batch = store.get(batch_id)
        # A tenant sees only its own batches: another tenant's is "not found".
        if batch is None or (multi_tenant and batch.tenant != tenant):
            raise _NotFound(batch_id)
        return batch

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller_tenant)], responses=_ERRORS)

    _add_submit_route(v1, client, settings, caller_tenant, options_base, text_pattern)

    @v1.get("/batches/{batch_id}", responses=_NOT_FOUND)
    def get_batch(batch: Annotated[Batch, Depends(own_batch)]) -> BatchStatus:
        """The batch's status and its jobs' counts by status."""
        return batch_summary(batch, client)

    @v1.get("/batches/{batch_id}/results", response_class=Response, responses=_RESULTS)
    def batch_results(batch: Annotated[Batch, Depends(own_batch)],
                      format: Literal["jsonl", "csv"] = "jsonl",  # noqa: A002 (the query parameter's name)
                      partial: Annotated[bool, Query(description="Answer before the batch is done")] = False,
                      ) -> Response:
        """One row per text, in input order: index, text, status, label, confidence, reply (the reply of
        a succeeded job only). 409 while jobs are queued or running, unless `partial=true`."""
        return _results_when_done(batch, client, format, partial)

    @v1.delete("/batches/{batch_id}", status_code=202, responses=_NOT_FOUND)
    def cancel_batch(batch: Annotated[Batch, Depends(own_batch)]) -> BatchStatus:
        """Cancel the batch's queued jobs (they never run); running ones finish, final ones stay."""
        _cancel_queued_jobs(batch, client, store)
        return batch_summary(batch, client)

    return v1


def _results_when_done(batch: Batch, client: Client, fmt: str, partial: bool) -> Response:
    summary = batch_summary(batch, client)
    if summary.status in ("queued", "running") and not partial:
        return _problem(409, "batch_not_done", f"batch {batch.batch_id} is {summary.status}: {summary.counts}; "
                                               "ask again when it is done, or with partial=true")
    return render_results(batch, client, fmt)


def _cancel_queued_jobs(batch: Batch, client: Client, store: BatchStore) -> None:
    """Cancel each of the batch's jobs still queued, and mark the batch cancelled."""
    for job_id, record in read_records(batch.job_ids, client.get_many):
        if record is not None and record.status is JobStatus.QUEUED:
            try:
                client.cancel(job_id)
            except (AlreadyFinal, JobNotFound):
                pass  # it started (it finishes) or ended meanwhile
    store.mark_cancelled(batch.batch_id)
    batch.cancelled = True


def _accepted(batch_id: str, jobs: int) -> JSONResponse:
    location = f"/v1/batches/{batch_id}"
    return JSONResponse(BatchAccepted(batch_id=batch_id, status="queued", location=location, jobs=jobs).model_dump(),
                        status_code=202, headers={"Location": location})


def _idempotency_header(value: str | None) -> str | None:
    """The Idempotency-Key of a JSON lines body (FastAPI checks the JSON form's by the same pattern)."""
    if value is not None and not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value):
        problem = "must be 1 to 255 printable ASCII characters, not starting or ending with a space"
        raise InvalidRequest(f"idempotency_key: {problem}", [("idempotency_key", problem)])
    return value


def _lines_route(submit_lines: Callable[[Request], Awaitable[Response]]) -> type[APIRoute]:
    class BatchSubmitRoute(APIRoute):
        """POST /v1/batches: a JSON lines body goes to ``submit_lines``; JSON to FastAPI's own handler."""

        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            json_handler = super().get_route_handler()

            async def handler(request: Request) -> Response:
                if is_ndjson(request.headers.get("content-type")):
                    return await submit_lines(request)
                return await json_handler(request)
            return handler
    return BatchSubmitRoute


def _add_submit_route(v1: APIRouter, client: Client, settings: ApiSettings, caller_tenant: Callable,
                      options_base: type[JobOptions], text_pattern: str) -> None:
    """POST /v1/batches, in both forms, both ending in ``accept``."""
    submitter = BatchSubmitter(client, BatchStore(client.store.redis, settings.result_ttl_s),
                               BatchClaims(client.store.redis, settings.result_ttl_s, LEASE_S))
    submit_rate = SubmitRate(client.store.redis, settings.tenant_submit_rate, settings.tenant_submit_burst)
    SubmitBatch = submit_batch_model(options_base, settings.max_batch_items,  # noqa: N806 (a class)
                                     settings.max_input_chars, text_pattern)
    BatchLine = line_model(options_base)  # noqa: N806 (a class)

    def accept(items: list[dict], tenant: str | None, key: str | None, where: Where,
               unread: list[dict] = ()) -> JSONResponse:
        submit_rate.spend(tenant)  # one submit token per batch
        requests = check_requests(items, tenant, settings.max_input_chars, where, unread)
        return _accepted(submitter.submit(requests, tenant, key), len(requests))

    async def submit_lines(request: Request) -> Response:
        tenant = caller_tenant(request.headers.get("x-api-key"))
        key = _idempotency_header(request.headers.get("idempotency-key"))
        items, line_numbers, unread = read_lines(await request.body(), BatchLine, settings.max_batch_items)
        return await run_in_threadpool(accept, items, tenant, key, lines_where(line_numbers), unread)

    def submit_batch(body: SubmitBatch, tenant: Annotated[str | None, Depends(caller_tenant)],
                     idempotency_key: Annotated[str | None, Header(description=_IDEMPOTENCY,
                                                                  pattern=IDEMPOTENCY_KEY_PATTERN)] = None,
                     ) -> BatchAccepted:
        """Queue every text as a bulk job of one batch: all of them, or (422 naming each bad
        `texts[i]`, 503 when the queue fills part way) none.

        Or send JSON lines (`Content-Type: application/x-ndjson` or `application/jsonl`): one job a
        line, with the fields of POST /v1/jobs that a batch job takes (`text`, `max_new_tokens`,
        `min_new_tokens`, `temperature`, `labels`); a bad line is named by its number and field."""
        options = body.model_dump(exclude={"texts"}, exclude_none=True)
        return accept([{"text": text, "options": options} for text in body.texts], tenant, idempotency_key,
                      texts_where)

    v1.add_api_route("/batches", submit_batch, methods=["POST"], status_code=202, responses=_SUBMIT_ERRORS,
                     route_class_override=_lines_route(submit_lines))


class _NotFound(Exception):
    def __init__(self, batch_id: str):
        super().__init__(f"batch {batch_id} not found (unknown id, or its record expired)")


def add_batch_routes(app, client: Client, settings: ApiSettings, tenant_of: Callable[[str | None], str | None],
                     options_base: type[JobOptions], text_pattern: str) -> None:
    """Add the /v1/batches routes, and their 404, to the gateway's app. ``options_base`` and
    ``text_pattern`` are POST /v1/jobs's (app.py), so both routes show the same rules."""
    app.include_router(batch_router(client, settings, tenant_of, options_base, text_pattern))

    @app.exception_handler(_NotFound)
    async def not_found(_, err: _NotFound) -> JSONResponse:
        return _problem(404, "not_found", str(err))

    @app.exception_handler(BatchBodyError)
    async def bad_body(_, err: BatchBodyError) -> JSONResponse:
        return JSONResponse({"detail": err.problems}, status_code=422)

    @app.exception_handler(BatchInProgress)
    async def in_progress(_, err: BatchInProgress) -> JSONResponse:
        return JSONResponse({"code": "batch_in_progress", "message": str(err)}, status_code=409,
                            headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER_S)})
