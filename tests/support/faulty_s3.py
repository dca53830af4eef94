"""A fault-injecting S3 endpoint for tests: a real HTTP server on loopback in front of moto.

It forwards every request to the upstream S3 server and can, on command,
- answer 503 ServiceUnavailable (an S3 error document) to the next N requests or for a
  while, optionally only for paths containing a marker;
- hold requests whose path contains a marker until released (a job stuck mid-download or
  mid-upload, so a test can kill its worker at a known moment). A held request whose client
  died meanwhile is dropped on release, never forwarded: it was still on its way, so the
  store never received it;
- count what it saw, per method and path, and the PUTs the store acknowledged (how many
  times each output was really written).

boto3 in a worker subprocess therefore sees real 5xx over HTTP; nothing is patched.
The test process controls the proxy directly (it runs on threads there).
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>injected by the faulty S3 proxy</Message></Error>"
)


class FaultyS3:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._fail_left = 0
        self._fail_until = 0.0
        self._fail_match = ""
        self._held_match: str | None = None
        self._held_method: str | None = None
        self._held_left: int | None = None
        self._release = threading.Event()
        self.failed = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        # PUTs the upstream store answered 2xx: objects written, per path.
        self.stored: Counter[str] = Counter()
        # Requests held now, per path; held requests dropped because their client died.
        self.held: Counter[str] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, *_: object) -> None:
                pass  # a client that went away (a killed worker) is expected here

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- control -----------------------------------------------------------------------

    def fail(self, *, count: int = 0, seconds: float = 0.0, match: str = "") -> None:
        """503 for the next `count` requests and/or for `seconds`, for paths containing
        `match` (every path when empty)."""
        with self._lock:
            self._fail_left = count
            self._fail_until = time.monotonic() + seconds if seconds else 0.0
            self._fail_match = match
            self.failed = 0

    def heal(self) -> None:
        self.fail()

    def hold(self, match: str, *, method: str | None = None, count: int | None = None) -> None:
        """Stall requests whose path contains `match` (and of `method`, if given) until
        release(): every one, or only the next `count` of them."""
        with self._lock:
            self._release.clear()
            self._held_match = match
            self._held_method = method
            self._held_left = count

    def release(self) -> None:
        with self._lock:
            self._held_match = None
            self._release.set()

    def count(self, method: str, path_part: str) -> int:
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if m == method and path_part in p)

    def writes(self, path_part: str) -> Counter[str]:
        """Objects written (PUTs the store acknowledged) per path containing `path_part`."""
        with self._lock:
            return Counter({p: n for p, n in self.stored.items() if path_part in p})

    def holding(self, path_part: str = "") -> list[str]:
        """The paths of the requests held now (one entry per request)."""
        with self._lock:
            return [p for p, n in self.held.items() if path_part in p for _ in range(n)]

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    # --- serving -----------------------------------------------------------------------

    def _should_fail(self, path: str) -> bool:
        with self._lock:
            if self._fail_match and self._fail_match not in path:
                return False
            if self._fail_left > 0:
                self._fail_left -= 1
                self.failed += 1
                return True
            if self._fail_until and time.monotonic() < self._fail_until:
                self.failed += 1
                return True
            return False

    def _take_hold(self, method: str, path: str) -> bool:
        with self._lock:
            if self._held_match is None or self._held_match not in path:
                return False
            if self._held_method is not None and method != self._held_method:
                return False
            if self._held_left is not None:
                if self._held_left == 0:
                    return False
                self._held_left -= 1
            self.held[path.split("?", 1)[0]] += 1
            return True

    def _wait_held(self, path: str) -> None:
        self._release.wait(timeout=120)
        with self._lock:
            self.held[path] -= 1
            if not self.held[path]:
                del self.held[path]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        key = path.split("?", 1)[0]
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests[(method, key)] += 1
        if self._take_hold(method, path):
            self._wait_held(key)
            if _client_gone(handler.connection):
                with self._lock:
                    self.dropped[(method, key)] += 1
                handler.close_connection = True
                return
        if self._should_fail(path):
            self._reply(handler, 503, {"Content-Type": "application/xml"}, _UNAVAILABLE)
            return
        upstream = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(method, path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            if method == "PUT" and 200 <= response.status < 300:
                with self._lock:
                    self.stored[key] += 1
            reply_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            self._reply(handler, response.status, reply_headers, data, head=method == "HEAD")
        finally:
            upstream.close()

    @staticmethod
    def _reply(
        handler: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        head: bool = False,
    ) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length":
                handler.send_header(name, value)
        length = headers.get("Content-Length") or headers.get("content-length")
        handler.send_header("Content-Length", length if head and length else str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client hung up: a client waiting for its answer sends nothing more, so a
    readable socket here means end of stream (or a reset)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
