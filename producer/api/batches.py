"""``/v1/batches``: many texts submitted as one batch, its status, its results, its cancel.

All or none: every text is validated (the job request's own rules) before any job is queued, and a
queue that fills part way cancels the jobs the batch had queued already, so a refused batch leaves
nothing behind. The jobs go to the bulk lane, as the caller's tenant's, through ``Client.submit``
(MAX_QUEUE, MAX_QUEUE_BULK and TENANT_MAX_QUEUE apply to each). The batch record is
``jobqueue.batches``'s.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.
import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field, ValidationError, create_model

from jobqueue.batches import (RESULT_COLUMNS, Batch, BatchStore, batch_status, job_status, read_records,
                              result_row)
from jobqueue.errors import AlreadyFinal, BrokerUnavailable, JobNotFound, QueueFull
from jobqueue.protocol import JobOptions, JobRequest, JobStatus, validation_problems
from producer.api.quotas import SubmitRate
from producer.client import Client
from producer.settings import ApiSettings

#: At most this many problems are named in a refused batch's 422 (the first ones, by index).
MAX_PROBLEMS_SHOWN = 50


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
    return create_model(
        "SubmitBatch", __base__=options_base,
        texts=(Annotated[list[text], Field(min_length=1, max_length=max_items, description=(
            f"The texts, 1 to {max_items}; each as POST /v1/jobs's text: not blank, "
            f"at most {max_input_chars} characters"))], ...),
    )


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def batch_problems(texts: list[str], options: dict, tenant: str | None, max_input_chars: int) -> list[dict]:
    """FastAPI-shaped 422 details, one per bad text: ``loc`` ["body", "texts", i], ``msg`` ``texts[i]: ...``."""
    problems = []
    for index, text in enumerate(texts):
        try:
            JobRequest.model_validate({"text": text, "tenant": tenant, "priority": "bulk", "options": options},
                                      context={"max_input_chars": max_input_chars})
        except ValidationError as err:
            for _, message in validation_problems(err):
                problems.append({"type": "invalid_request", "loc": ["body", "texts", index],
                                 "msg": f"texts[{index}]: {message}"})
    return problems


def submit_all(client: Client, texts: list[str], options: dict, tenant: str | None) -> list[str]:
    """Queue every text as a bulk job, in order; if the queue fills (or Redis goes) part way, cancel
    the jobs queued so far and raise the error, its message saying so."""
    job_ids: list[str] = []
    try:
        for text in texts:
            job_ids.append(client.submit(text, tenant=tenant, priority="bulk", **options))
    except (QueueFull, BrokerUnavailable) as err:
        for job_id in job_ids:
            try:
                client.cancel(job_id)
            except (AlreadyFinal, JobNotFound, BrokerUnavailable):
                pass  # it ran already (a fast worker), or Redis is gone: the message below still holds for the rest
        err.args = (f"{err} (the batch stopped at texts[{len(job_ids)}]; the {len(job_ids)} jobs it had "
                    "queued were cancelled: nothing of it runs)",)
        raise
    return job_ids


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
    """The /v1/batches routes. Longer than 60 lines: the four routes are declared next to the
    dependencies they close over (as in app.py's _jobs_router)."""
    store = BatchStore(client.store.redis, settings.result_ttl_s)
    submit_rate = SubmitRate(client.store.redis, settings.tenant_submit_rate, settings.tenant_submit_burst)
    SubmitBatch = submit_batch_model(options_base, settings.max_batch_items,  # noqa: N806 (a class)
                                     settings.max_input_chars, text_pattern)
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

    @v1.post("/batches", status_code=202, responses=_SUBMIT_ERRORS)
    def submit_batch(body: SubmitBatch, tenant: Annotated[str | None, Depends(caller_tenant)]) -> BatchAccepted:
        """Queue every text as a bulk job of one batch: all of them, or (422 naming each bad
        `texts[i]`, 503 when the queue fills part way) none."""
        submit_rate.spend(tenant)  # one submit token per batch
        options = body.model_dump(exclude={"texts"}, exclude_none=True)
        problems = batch_problems(body.texts, options, tenant, settings.max_input_chars)
        if problems:
            return JSONResponse({"detail": problems[:MAX_PROBLEMS_SHOWN]}, status_code=422)
        batch = store.create(tenant, submit_all(client, body.texts, options, tenant))
        location = f"/v1/batches/{batch.batch_id}"
        return JSONResponse(BatchAccepted(batch_id=batch.batch_id, status="queued", location=location,
                                          jobs=len(batch.job_ids)).model_dump(),
                            status_code=202, headers={"Location": location})

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
        summary = batch_summary(batch, client)
        if summary.status in ("queued", "running") and not partial:
            return _problem(409, "batch_not_done", f"batch {batch.batch_id} is {summary.status}: {summary.counts}; "
                                                   "ask again when it is done, or with partial=true")
        return render_results(batch, client, format)

    @v1.delete("/batches/{batch_id}", status_code=202, responses=_NOT_FOUND)
    def cancel_batch(batch: Annotated[Batch, Depends(own_batch)]) -> BatchStatus:
        """Cancel the batch's queued jobs (they never run); running ones finish, final ones stay."""
        for job_id, record in read_records(batch.job_ids, client.get_many):
            if record is not None and record.status is JobStatus.QUEUED:
                try:
                    client.cancel(job_id)
                except (AlreadyFinal, JobNotFound):
                    pass  # it started (it finishes) or ended meanwhile
        store.mark_cancelled(batch.batch_id)
        batch.cancelled = True
        return batch_summary(batch, client)

    return v1


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
