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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import ValidationError

from producer.api.batches import add_batch_routes
from producer.api.callbacks import CallbackSender
from producer.api.jobs import VISIBLE_TEXT_PATTERN, jobs_router
from producer.api.jobs import Access as _Access
from producer.api.jobs import _JsonTypedJobOptions
from producer.api.limits import BodyLimit
from producer.api.openai_compat import add_chat_completions
from producer.api.problems import add_error_handlers
from producer.api.service import add_service_routes
from producer.client import Client
from jobqueue.settings import settings_problems
from producer.settings import ApiSettings

# The routes live in routers of their own: jobs.py (/v1/jobs), batches.py (/v1/batches),
# openai_compat.py (/v1/chat/completions), service.py (health, metrics, the page);
# problems.py answers errors.


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
    add_error_handlers(app, settings.max_body_bytes)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       path_limits={"/v1/batches": settings.max_batch_body_bytes})
    app.include_router(jobs_router(client, settings))
    add_batch_routes(app, client, settings, _Access(client, settings).tenant_of, _JsonTypedJobOptions,
                     VISIBLE_TEXT_PATTERN)
    # OpenAI's chat-completions API over the same queue; the same keys, sent as a Bearer token.
    add_chat_completions(app, client, settings, _Access(client, settings).tenant_of)
    add_service_routes(app, client)
    return app


def _settings_from_environment() -> ApiSettings:
    """The gateway's settings, or it stops with one line naming each bad variable (never a key's value)."""
    try:
        return ApiSettings()
    except ValidationError as err:
        raise SystemExit(f"qwen-allinone gateway: cannot start: {settings_problems(err)}") from None
