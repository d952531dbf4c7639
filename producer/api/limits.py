"""What the gateway does with hostile requests before any route runs: oversized bodies, unprintable errors.

- ``BodyLimit``: an ASGI middleware that answers 413 for a body over
  ``MAX_BODY_BYTES``, by its Content-Length at once or, for a chunked body,
  as soon as the bytes read pass the limit, so a 300 MB body is never read
  whole, let alone parsed.
- ``printable_errors``: FastAPI's 422 echoes the offending input; an infinite
  number, a NaN or a lone surrogate cannot be written as JSON text in UTF-8, and
  the echo itself then failed with a 500. The details are made printable.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


#: The setting behind a path's own limit (``BodyLimit``'s ``path_limits``), named in its 413.
LIMIT_SETTINGS = {"/v1/batches": "MAX_BATCH_BODY_BYTES"}


class BodyTooLarge(HTTPException):
    """Raised while a chunked body is read; an HTTPException, so FastAPI passes it on (as 413)."""

    def __init__(self, max_bytes: int, setting: str = "MAX_BODY_BYTES"):
        self.max_bytes, self.setting = max_bytes, setting
        super().__init__(413, too_large_message(max_bytes, setting))


def too_large_message(max_bytes: int, setting: str = "MAX_BODY_BYTES") -> str:
    return f"the request body is over {setting} ({max_bytes} bytes)"


def too_large_response(max_bytes: int, setting: str = "MAX_BODY_BYTES") -> JSONResponse:
    return JSONResponse({"code": "body_too_large", "message": too_large_message(max_bytes, setting)},
                        status_code=413, headers={"Connection": "close"})


class BodyLimit:
    """``max_bytes`` for every path but those of ``path_limits`` (path → its own limit, e.g. batches)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app, self.default_max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        max_bytes = self.path_limits.get(path, self.default_max_bytes)
        setting = LIMIT_SETTINGS.get(path, "MAX_BODY_BYTES") if path in self.path_limits else "MAX_BODY_BYTES"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await too_large_response(max_bytes, setting)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge(max_bytes, setting)
            return message

        await self.app(scope, counted, send)


def printable_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's validation errors with every value JSON- and UTF-8-safe (an unprintable input is left out)."""
    return [_printable(error) for error in errors]


def _printable(error: dict[str, Any]) -> dict[str, Any]:
    shown = {"type": error.get("type"), "loc": [_safe_text(part) if isinstance(part, str) else part
                                                for part in error.get("loc", ())],
             "msg": _safe_text(str(error.get("msg", "")))}
    for key in ("input", "ctx"):
        if key in error and _encodable(error[key]):
            shown[key] = error[key]
    return shown


def _safe_text(text: str) -> str:
    # A lone surrogate becomes its escape (\ud800): visible, and valid UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return False
    return True
