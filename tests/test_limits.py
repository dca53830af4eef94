"""The request guard and the rate limiter as pure logic: an ASGI app driven by hand, so a test
can see exactly how much of a body was read, and a clock that moves only when told."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from producer.limits import SMALL_BODY_BYTES, GuardPolicy, RateLimiter, RequestGuard

JOBS = ("POST", "/v1/jobs")


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Body:
    """An ASGI receive() that hands out `chunks` and records how many were taken."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        if self.taken == len(self.chunks):
            return {"type": "http.disconnect"}
        self.taken += 1
        more = self.taken < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.taken - 1], "more_body": more}


class App:
    """The app behind the guard: records the body it got and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def guard(
    app: App, *, limit: int = 100, token: str | None = "good", limiter: RateLimiter | None = None
) -> RequestGuard:
    policy = GuardPolicy(
        body_limits={JOBS: limit},
        authenticated=None if token is None else (lambda header: header == f"Bearer {token}"),
        limiter=limiter or RateLimiter(0, 1),
    )
    return RequestGuard(app, policy)


def call(
    middleware: RequestGuard,
    body: Body,
    *,
    method: str = "POST",
    path: str = "/v1/jobs",
    headers: dict[str, str] | None = None,
    client: str = "198.51.100.1",
) -> tuple[int, dict[str, str], Any]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": (client, 5000),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, body, send))
    start, payload = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], answer, json.loads(payload) if start["status"] != 200 else payload


AUTHORIZED = {"Authorization": "Bearer good"}


def test_a_body_under_the_cap_reaches_the_app_whole_however_it_was_chunked() -> None:
    app = App()
    status, _, _ = call(guard(app), Body(b"[1,", b"2,", b"3]"), headers=AUTHORIZED)
    assert status == 200 and app.bodies == [b"[1,2,3]"]


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_cap() -> None:
    app, body = App(), Body(*[b"x" * 40] * 10)
    status, _, answer = call(guard(app, limit=100), body, headers=AUTHORIZED)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert body.taken == 3  # 120 bytes read of 400; the rest never
    assert app.bodies == []


def test_a_declared_content_length_over_the_cap_is_refused_without_reading() -> None:
    app, body = App(), Body(b"x" * 10)
    headers = AUTHORIZED | {"Content-Length": "1000000"}
    status, _, _ = call(guard(app, limit=100), body, headers=headers)
    assert status == 413 and body.taken == 0


def test_routes_without_a_limit_of_their_own_take_small_bodies() -> None:
    app = App()
    big = Body(b"x" * (SMALL_BODY_BYTES + 1))
    status, _, _ = call(guard(app, limit=10**9), big, path="/v1/backfills", headers=AUTHORIZED)
    assert status == 413


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer bad"}, {"Authorization": "Basic good"}],
    ids=["none", "wrong", "basic"],
)
def test_a_v1_request_without_a_valid_token_is_refused_before_its_body_is_read(
    headers: dict[str, str],
) -> None:
    app, body = App(), Body(b"x" * 50)
    status, answer_headers, answer = call(guard(app), body, headers=headers)
    assert status == 401 and answer["error"]["code"] == "unauthorized"
    assert answer_headers["www-authenticate"] == "Bearer"
    assert body.taken == 0 and app.bodies == []


def test_an_open_api_lets_its_data_routes_through_unlimited() -> None:
    limiter = RateLimiter(1, 1, clock=Clock())
    app = App()
    statuses = [call(guard(app, token=None, limiter=limiter), Body(b"{}"))[0] for _ in range(5)]
    assert statuses == [200] * 5


def test_the_guard_limits_public_routes_per_client_and_says_when_to_retry() -> None:
    clock = Clock()
    middleware = guard(App(), limiter=RateLimiter(0.5, 2, clock=clock))
    statuses = [call(middleware, Body(b""), method="GET", path="/metrics")[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, headers, answer = call(middleware, Body(b""), method="GET", path="/healthz")
    assert status == 429 and headers["retry-after"] == "2"
    assert answer["error"]["code"] == "rate_limited"
    assert call(middleware, Body(b""), method="GET", path="/metrics", client="192.0.2.7")[0] == 200
    assert call(middleware, Body(b""), method="GET", path="/metrics", headers=AUTHORIZED)[0] == 200
    clock.now += 2
    assert call(middleware, Body(b""), method="GET", path="/metrics")[0] == 200


def test_a_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("a") == 0
    clock.now += 60  # a long pause refills to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_a_rate_of_zero_turns_the_limit_off() -> None:
    limiter = RateLimiter(0, 1)
    assert all(limiter.acquire("a") == 0 for _ in range(100))


def test_the_limiter_forgets_the_least_recently_seen_clients_beyond_its_capacity() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 1, clock=clock, max_clients=2)
    for client in ("a", "b", "c"):
        limiter.acquire(client)
    # "a" was forgotten: a full bucket again. "c" was not: still empty.
    assert limiter.acquire("a") == 0
    assert limiter.acquire("c") > 0
