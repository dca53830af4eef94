"""Limits on what the API takes in before any route sees it: request body sizes, and a
per-client rate on requests that carry no valid token.

`RequestGuard` is a plain ASGI middleware, so it sees the body as it streams in: a body over
its cap is refused (413) as soon as the cap is passed, whether it announced a Content-Length
or came chunked, and the route never reads it. A /v1 request without a valid token is refused
(401) before its body is read, so nobody without a token can make the API read and parse
megabytes.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A route not named in the body limits takes at most this much (a backfill, an empty POST).
SMALL_BODY_BYTES = 64 * 1024
# Client addresses remembered at once; the least recently seen is forgotten first (a full
# bucket and a forgotten one are the same thing, so only a client over its rate loses state).
MAX_CLIENTS = 10_000
PROTECTED_PREFIX = "/v1/"
# Set in the scope once the guard has found a valid token, so the routes' own check does not
# compare it a second time.
VERIFIED_TOKEN = "backdrop.verified_token"


class _Disconnected(Exception):
    """The client went away before its body was complete."""


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `rate_per_s`."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._max_clients = max_clients
        # client -> (tokens left, when counted). Only the event loop's thread touches it.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, client: str) -> float:
        """Take one token: 0.0 when the request may go ahead, else seconds until it may."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, counted = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard enforces; `authenticated(header)` says whether an Authorization header
    carries a valid token (None: the API runs without tokens). The `streamed` routes read
    and cap their own bodies as they stream in (uploads): the guard passes them on unread."""

    body_limits: Mapping[tuple[str, str], int]
    authenticated: Callable[[str], bool] | None
    limiter: RateLimiter
    streamed: frozenset[tuple[str, str]] = frozenset()


class RequestGuard:
    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        token_ok = self._token_ok(scope)
        if not token_ok:
            wait = self.policy.limiter.acquire(_client(scope))
            if wait > 0:
                await _refuse(
                    send,
                    429,
                    "rate_limited",
                    "too many requests without a valid token from this address; "
                    f"retry in {math.ceil(wait)} s",
                    {"Retry-After": str(math.ceil(wait))},
                )
                return
            if path.startswith(PROTECTED_PREFIX) and self.policy.authenticated is not None:
                given = _header(scope, b"authorization")
                await _refuse(
                    send,
                    401,
                    "unauthorized",
                    "invalid bearer token"
                    if given
                    else "missing bearer token (Authorization: Bearer <token>)",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        if (scope["method"], path) in self.policy.streamed:
            await self.app(scope, receive, send)
            return
        limit = self.policy.body_limits.get((scope["method"], path), SMALL_BODY_BYTES)
        try:
            body = await _read_body(scope, receive, limit)
        except _Disconnected:
            return  # nobody is left to answer
        if body is None:
            await _refuse(
                send,
                413,
                "request_too_large",
                f"request body over {limit} bytes for {scope['method']} {path}",
                # No "Connection: close": closing with the rest of the body unread would
                # reset the connection, and the client might never read this answer.
                # uvicorn discards what is left of the body instead.
                {},
            )
            return
        await self.app(scope, _replay(body, receive), send)

    def _token_ok(self, scope: Scope) -> bool:
        check = self.policy.authenticated
        if check is None:
            # An open API (insecure-no-auth): its data routes are everyone's; only the public
            # routes are rate limited, as they are with tokens.
            path: str = scope["path"]
            return path.startswith(PROTECTED_PREFIX)
        verified = check(_header(scope, b"authorization"))
        scope[VERIFIED_TOKEN] = verified
        return verified


def _client(scope: Scope) -> str:
    client: tuple[str, int] | None = scope.get("client")
    return client[0] if client else "unknown"


def _header(scope: Scope, name: bytes) -> str:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is never read)."""
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(
    send: Send, status: int, code: str, message: str, headers: Mapping[str, str]
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
