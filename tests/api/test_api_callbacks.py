"""Completion callbacks through a real gateway and worker: a receiver on localhost gets one signed POST of the
final record (Standard Webhooks), retried after a 500."""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook

from tests.api.conftest import start_gateway, wait_final

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"callback-secret-of-32-bytes-long").decode()


class Receiver(ThreadingHTTPServer):
    """Answers 500 to the first POST and 200 after; keeps what each POST carried."""

    def __init__(self):
        self.posts: list[tuple[int, dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805 (the handler's own self)
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                status = 500 if not self.posts else 200
                self.posts.append((status, dict(handler.headers), body))
                handler.send_response(status)
                handler.end_headers()

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def calling_gateway(redis_url, api_worker, receiver, tmp_path_factory):
    # An address is allowed only with its port listed (and only because it is listed itself).
    env = {"REDIS_URL": redis_url, "CALLBACK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.server_address[1]}",
           "CALLBACK_SECRET": SECRET}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "calling-gateway.log")
    yield gateway
    gateway.stop()


def test_a_final_job_is_posted_once_signed_and_retried_after_a_500(calling_gateway, receiver, figures):
    with httpx.Client(base_url=calling_gateway.url, timeout=30) as http:
        accepted = http.post("/v1/jobs", json={"text": "好吃", "max_new_tokens": 4, "callback_url": receiver.url})
        assert accepted.status_code == 202, accepted.text
        final = wait_final(http, accepted.json()["job_id"])
    deadline = time.monotonic() + 15
    while len(receiver.posts) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # a third POST would come within the backoff's next step: there must be none
    figures.update(posts=len(receiver.posts), statuses=[status for status, _, _ in receiver.posts])
    assert [status for status, _, _ in receiver.posts] == [500, 200]
    for _, headers, body in receiver.posts:
        assert Webhook(SECRET).verify(body, headers) == final  # signed (Standard Webhooks): the final record
        assert headers["webhook-id"] == final["job_id"]


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "ftp://127.0.0.1/hook", "http://127.0.0.1.evil.example/x",
                                 "http://127.0.0.1/hook", "http://127.0.0.1:22/hook"])
def test_a_callback_to_a_host_not_allowed_is_refused(calling_gateway, url):
    with httpx.Client(base_url=calling_gateway.url, timeout=30) as http:
        refused = http.post("/v1/jobs", json={"text": "好吃", "callback_url": url})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"][-1] == "callback_url"
