"""A real HTTP(S) receiver for callbacks on loopback: records every request and answers with
the statuses a test scripts (then 200), optionally holding its answer until released."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The secret the tests' deliveries are signed with (settings.callback_secret).
CALLBACK_SECRET = "test-callback-secret"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self._answers: list[int] = []
        self._changed = threading.Condition()
        self.release = threading.Event()
        self.release.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        # A short poll interval: shutdown() waits for the serving loop's next look.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/hooks/backdrop") -> str:
        return f"http://{self.host_port}{path}"

    def answer(self, statuses: Iterable[int]) -> None:
        """The next requests get these statuses, in order; later ones get 200."""
        with self._changed:
            self._answers = list(statuses)

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        """Block until `count` requests have arrived (AssertionError after `timeout`)."""
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.received) >= count, timeout)
            assert arrived, f"{len(self.received)} of {count} callbacks arrived in {timeout}s"
            return list(self.received)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    status = receiver._answers.pop(0) if receiver._answers else 200
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    receiver._changed.notify_all()
                receiver.release.wait(60)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.url("/elsewhere"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
