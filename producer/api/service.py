"""Health, metrics and the web page: the gateway's routes that need no API key."""

import importlib.resources
from typing import Literal

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.api.metrics import build_registry
from producer.api.watch import CachedPing
from producer.client import Client
from jobqueue.errors import BrokerUnavailable

#: /healthz waits this long for workers to answer Celery's ping.
HEALTH_PING_TIMEOUT_S = 1.0
#: /healthz answers from a ping at most this old; one ping serves every caller meanwhile.
HEALTH_PING_MAX_AGE_S = 2.0


class Health(BaseModel):
    #: ok: Redis answers and at least one worker answered the ping; otherwise unavailable (503).
    status: Literal["ok", "unavailable"]
    redis: Literal["ok", "unreachable"]
    #: Names of the workers that answered Celery's ping within HEALTH_PING_TIMEOUT_S
    #: (a ping at most HEALTH_PING_MAX_AGE_S old).
    workers: list[str]
    #: Jobs waiting in the queue; null when Redis is unreachable.
    queue_depth: int | None


def add_service_routes(app: FastAPI, client: Client) -> None:
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
