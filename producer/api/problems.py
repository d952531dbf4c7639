"""The gateway's errors: the ``{"code", "message"}`` answers, their Retry-After, and how each
error the client raises is answered (``add_error_handlers``); the OpenAPI texts of those answers."""

from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from producer.api.limits import BodyTooLarge, printable_errors, too_large_response
from producer.api.quotas import RateLimited
from producer.api.watch import StreamsFull, TenantStreamsFull
from jobqueue.errors import BrokerUnavailable, InvalidRequest, QueueFull, TenantQueueFull, UnreadableRecord

#: Retry-After on a full queue: long enough for a worker to finish a few jobs.
QUEUE_FULL_RETRY_AFTER_S = 5
#: Retry-After when Redis is unreachable: a restart or a network blip.
BROKER_DOWN_RETRY_AFTER_S = 2
#: Retry-After when MAX_EVENT_STREAMS streams are open.
STREAMS_FULL_RETRY_AFTER_S = 5


class UnreadableBody(BaseModel):
    #: FastAPI's answer to a body that is not JSON text at all.
    detail: str


class ApiError(BaseModel):
    code: Literal["unauthorized", "not_found", "queue_full", "broker_unavailable", "unreadable_record",
                  "body_too_large", "too_many_streams"]
    message: str


class ApiProblem(Exception):
    """An error answered with ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(message)


def problem_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _where(field: str) -> list[str]:
    # The client validates the nested request (options.max_new_tokens); the body is flat. The
    # idempotency key comes in a header.
    return ["header", "Idempotency-Key"] if field == "idempotency_key" else ["body", field.removeprefix("options.")]


#: The errors answered with their message as ``{"code", "message"}``: status, code, Retry-After (or None).
_ANSWERS: dict[type[Exception], tuple[int, str, int | None]] = {
    QueueFull: (503, "queue_full", QUEUE_FULL_RETRY_AFTER_S),
    TenantQueueFull: (503, "tenant_queue_full", QUEUE_FULL_RETRY_AFTER_S),
    TenantStreamsFull: (429, "tenant_streams_full", STREAMS_FULL_RETRY_AFTER_S),
    BrokerUnavailable: (503, "broker_unavailable", BROKER_DOWN_RETRY_AFTER_S),
    StreamsFull: (503, "too_many_streams", STREAMS_FULL_RETRY_AFTER_S),
    UnreadableRecord: (500, "unreadable_record", None),
}


def add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """How each error is answered: FastAPI's and Starlette's own in their shape, the client's and the
    gateway's as ``{"code", "message"}`` (``_ANSWERS``), with Retry-After where a retry may help."""

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

    app.add_exception_handler(RequestValidationError, _unvalidated)
    app.add_exception_handler(BodyTooLarge, _too_large)
    app.add_exception_handler(ApiProblem, _problem)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(RateLimited, _rate_limited)
    for error, (status, code, retry_after_s) in _ANSWERS.items():
        app.add_exception_handler(error, _answer(status, code, retry_after_s))


async def _unvalidated(_: Request, err: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422, with inputs it could not print as JSON (inf, NaN, lone surrogates) left out.
    return JSONResponse({"detail": printable_errors(list(err.errors()))}, status_code=422)


async def _too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
    return too_large_response(err.max_bytes, err.setting)  # the path's own limit (batches have theirs)


async def _problem(_: Request, err: ApiProblem) -> JSONResponse:
    return problem_response(err.status, err.code, err.message, err.headers)


async def _invalid(_: Request, err: InvalidRequest) -> JSONResponse:
    # The same shape as FastAPI's own 422, so clients read one format.
    detail = [{"type": "invalid_request", "loc": _where(field), "msg": message}
              for field, message in err.problems]
    return JSONResponse({"detail": detail}, status_code=422)


async def _rate_limited(_: Request, err: RateLimited) -> JSONResponse:
    return problem_response(429, "rate_limited", str(err), {"Retry-After": str(err.retry_after_s)})


def _answer(status: int, code: str, retry_after_s: int | None) -> Callable[..., Awaitable[JSONResponse]]:
    async def answer(_: Request, err: Exception) -> JSONResponse:
        headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
        return problem_response(status, code, str(err), headers)
    return answer


_UNAUTHORIZED = "The gateway needs a key, and the X-API-Key header is missing or wrong"
_BROKER_DOWN = "Redis is unreachable (broker_unavailable); Retry-After says when to retry"
_UNKNOWN_JOB = "Unknown job id, or its record expired"
ERRORS = {401: {"model": ApiError, "description": _UNAUTHORIZED}, 503: {"model": ApiError, "description": _BROKER_DOWN}}
NOT_FOUND = {404: {"model": ApiError, "description": _UNKNOWN_JOB}}
IDEMPOTENCY = ("Retried while the first job's record is kept, the same key answers the first submit's job, and queues no other; "
                "the same key with another body is refused (422). 1 to 255 printable ASCII characters")


def _json_error(description: str) -> dict:
    # FastAPI documents a `model` in the route's own media type; the event stream's
    # errors are JSON, so they are spelled out.
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}}


STREAM_ERRORS = {401: _json_error(_UNAUTHORIZED), 404: _json_error(_UNKNOWN_JOB),
                  429: _json_error("The tenant has as many streams open as it may (tenant_streams_full); "
                                   "Retry-After says when to retry"),
                  503: _json_error(_BROKER_DOWN + "; or too many streams are open (too_many_streams)")}
