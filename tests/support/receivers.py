"""Real HTTP receivers for the callback tests, each on its own thread on 127.0.0.1.

``Receiver(mode="ok")`` answers 200 at once; ``mode="drip"`` sends its headers and then
one byte of its body every ``drip_every_s`` for ``drip_for_s`` (a receiver that holds an
attempt open); ``mode="fail"`` answers 500. Each keeps the headers and body of every POST
and when it arrived (``time.monotonic()``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Post:
    headers: dict[str, str]
    body: bytes
    arrived: float


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str = "ok", drip_for_s: float = 60.0, drip_every_s: float = 0.3, port: int = 0):
        self.mode, self.drip_for_s, self.drip_every_s = mode, drip_for_s, drip_every_s
        self.posts: list[Post] = []
        self.got_one = threading.Event()
        self.stopped = threading.Event()
        super().__init__(("127.0.0.1", port), _handler(self))
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


def _handler(server: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            server.posts.append(Post(dict(self.headers), body, time.monotonic()))
            server.got_one.set()
            if server.mode == "drip":
                self._drip()
                return
            self.send_response(500 if server.mode == "fail" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _drip(self) -> None:
            steps = int(server.drip_for_s / server.drip_every_s)
            self.send_response(200)
            self.send_header("Content-Length", str(steps))
            self.end_headers()
            try:
                for _ in range(steps):
                    if server.stopped.wait(server.drip_every_s):
                        return
                    self.wfile.write(b".")
                    self.wfile.flush()
            except OSError:  # the sender hung up: what a deadline does
                return

        def log_message(self, *args):
            pass

    return Handler
