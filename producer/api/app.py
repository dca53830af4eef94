"""The app factory and `backdrop api`'s server.

With no tokens configured the API refuses to start unless BACKDROP_API_INSECURE_NO_AUTH=true
(`backdrop api --insecure-no-auth`); a token under MIN_TOKEN_LENGTH characters, or one of the
placeholders examples have shipped, stops it too.

Before any route: bodies are capped as they stream in, requests without a valid token are
rate limited per client address and, on /v1, refused before their body is read
(`producer/limits.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from producer import stats
from producer.api import backfills, jobs, ops, process
from producer.api.auth import BearerAuth
from producer.api.deps import ApiState
from producer.api.errors import add_error_handlers
from producer.api.series import SeriesCache
from producer.backfill import BackfillRunner
from producer.client import Client
from producer.db import session_scope
from producer.errors import ApiMisconfigured
from producer.limits import GuardPolicy, RateLimiter, RequestGuard
from producer.metrics import ApiMetrics, StoreReading
from producer.services import Services, default_services
from producer.settings import Settings
from producer.thumbnail import Thumbnails

log = logging.getLogger(__name__)

# secrets.token_urlsafe(24) is 32 characters: 192 random bits.
MIN_TOKEN_LENGTH = 32
# Tokens example files have shipped: a copy of an old example must not start a live API.
PLACEHOLDER_TOKENS = frozenset({"change-me-to-a-long-random-token", "CHANGE-ME"})
TOKEN_FIX = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def create_app(services: Services | None = None) -> FastAPI:
    """The API over `services`' database, broker and storage (default: this process's)."""
    services = services or default_services()
    settings = services.settings
    check_tokens(settings)
    metrics = ApiMetrics(lambda: _scrape_stats(settings), refresh_s=settings.api_metrics_refresh_s)
    auth = BearerAuth(settings.api_tokens)
    app = FastAPI(
        title="Backdrop",
        summary="Queue-based background removal, replacement, blur and desaturation",
        version="0.1.0",
        # Swagger UI and ReDoc fetch their scripts from a CDN: opt-in only.
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    app.state.backdrop = ApiState(
        services=services,
        client=Client(services),
        backfills=BackfillRunner(services),
        metrics=metrics,
        auth=auth,
        thumbnails=Thumbnails(settings.api_thumbnail_max_pixels),
        series=SeriesCache(
            lambda window: stats.collect_series(settings, window),
            max_age_s=settings.api_series_refresh_s,
        ),
    )
    add_error_handlers(app)
    app.add_middleware(RequestGuard, policy=_guard_policy(settings, auth))
    # Added last, so outermost: it also counts what the guard refuses.
    _add_request_metrics(app, metrics)
    for router in (jobs.router, process.router, backfills.router, ops.router):
        app.include_router(router)
    return app


def check_tokens(settings: Settings) -> None:
    """Refuse to serve with no tokens (unless explicitly open), or with a weak one."""
    if not settings.api_tokens and not settings.api_insecure_no_auth:
        raise ApiMisconfigured(
            "no API tokens: set BACKDROP_API_TOKENS, or BACKDROP_API_INSECURE_NO_AUTH=true "
            "(--insecure-no-auth) to run the API open to anyone who can reach it"
        )
    if not settings.api_tokens:
        log.warning("the API runs WITHOUT authentication (insecure-no-auth)")
    # Never the token itself in the message: a short one may still be a real secret.
    for position, token in enumerate(settings.api_tokens, 1):
        if token in PLACEHOLDER_TOKENS:
            problem = "is the placeholder from an example file"
        elif len(token) < MIN_TOKEN_LENGTH:
            problem = f"is {len(token)} characters long, under {MIN_TOKEN_LENGTH}"
        else:
            continue
        raise ApiMisconfigured(
            f"BACKDROP_API_TOKENS: token {position} {problem}; generate one with {TOKEN_FIX}"
        )


def _guard_policy(settings: Settings, auth: BearerAuth) -> GuardPolicy:
    return GuardPolicy(
        body_limits={("POST", "/v1/jobs"): settings.api_max_body_bytes},
        authenticated=auth.accepts if settings.api_tokens else None,
        limiter=RateLimiter(settings.api_rate_limit_per_s, settings.api_rate_limit_burst),
        streamed=frozenset({("POST", process.PATH)}),
    )


def serve(
    host: str | None = None,
    port: int | None = None,
    *,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the API with uvicorn until interrupted (`backdrop api`); once it listens, call
    `on_listening` with the dashboard's address."""
    import uvicorn

    services = default_services()
    app = create_app(services)
    listen_host = host or services.settings.api_host
    listen_port = port or services.settings.api_port

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_listening is not None:
                on_listening(dashboard_url(listen_host, listen_port))

    Server(uvicorn.Config(app, host=listen_host, port=listen_port)).run()


def dashboard_url(host: str, port: int) -> str:
    """The dashboard's address as a browser on this host reaches it: a server listening on
    every interface is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/dashboard"


def _add_request_metrics(app: FastAPI, metrics: ApiMetrics) -> None:
    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = _route_template(app, request.scope)
            metrics.observe_request(request.method, route, status, time.perf_counter() - started)


def _route_template(app: FastAPI, scope: Scope) -> str:
    """The route template, not the path: job ids would explode the label set. A request
    the guard refused never reached the router: match it here."""
    if "route" in scope:
        return str(getattr(scope["route"], "path", "unmatched"))
    for route in routes(app):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


def routes(app: FastAPI) -> list[BaseRoute]:
    """Every route of the app, those of its routers included: FastAPI keeps an included
    router as one route of the app."""
    return [context.original_route for context in iter_route_contexts(app.routes)]


def _scrape_stats(settings: Settings) -> StoreReading:
    with session_scope(settings.database_url) as session:
        by_queue = stats.counts_by_queue(session)
    return by_queue, stats.queue_depths(settings, [])
