"""The HTTP API (`backdrop api`): jobs, stats, Prometheus metrics, health and the dashboard.

Auth: every route but /healthz, /metrics, /openapi.json and the dashboard page itself needs
`Authorization: Bearer <token>` with one of BACKDROP_API_TOKENS. The dashboard page holds no
data; its script calls the authenticated endpoints with a token it takes from the URL
fragment (`/dashboard#token=…`, never sent to the server, so never in access logs) or from a
prompt, and keeps it in the tab's sessionStorage. With no tokens configured the API refuses
to start unless BACKDROP_API_INSECURE_NO_AUTH=true (`backdrop api --insecure-no-auth`); a
token under MIN_TOKEN_LENGTH characters, or one of the placeholders examples have shipped,
stops it too.

Before any route: bodies are capped as they stream in, requests without a valid token are
rate limited per client address and, on /v1, refused before their body is read
(`producer/limits.py`). Path and query parameters are checked for shape before they reach
the database, so a hostile value is a 4xx, never a 500.

The Client does blocking I/O (SQL, Redis, storage), so the endpoints are plain `def`s that
FastAPI runs in its threadpool.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from producer import client as client_module
from producer import stats
from producer.backfill import MAX_IN_FLIGHT, BackfillNotFound, Backfills
from producer.client import Client
from producer.db import session_scope
from producer.errors import (
    AccessDenied,
    BackdropError,
    BackgroundNotFound,
    InputNotFound,
    InputTooLarge,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    PermanentError,
    TransientError,
)
from producer.limits import VERIFIED_TOKEN, GuardPolicy, RateLimiter, RequestGuard
from producer.metrics import ApiMetrics
from producer.request import JobRequest, parse_request
from producer.settings import Settings, get_settings
from producer.thumbnail import Thumbnails

log = logging.getLogger(__name__)


class Unauthorized(BackdropError):
    code = "unauthorized"


class BatchTooLarge(InvalidRequest):
    code = "batch_too_large"


class ApiMisconfigured(BackdropError):
    code = "api_misconfigured"


# First match wins, so subclasses come before their bases.
ERROR_STATUS: tuple[tuple[type[BackdropError], int], ...] = (
    (Unauthorized, 401),
    (AccessDenied, 403),
    (JobNotFound, 404),
    (BackfillNotFound, 404),
    (InputNotFound, 404),
    (BackgroundNotFound, 404),
    (InvalidTransition, 409),
    (BatchTooLarge, 413),
    (InputTooLarge, 413),
    (PermanentError, 422),
    (TransientError, 503),
)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
# secrets.token_urlsafe(24) is 32 characters: 192 random bits.
MIN_TOKEN_LENGTH = 32
# Tokens example files have shipped: a copy of an old example must not start a live API.
PLACEHOLDER_TOKENS = frozenset({"change-me-to-a-long-random-token", "CHANGE-ME"})
TOKEN_FIX = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Job and backfill ids are uuid4 strings; anything else cannot name one.
ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_CURSOR_LENGTH = 200
THUMBNAIL_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
# Inline script and style only; thumbnails arrive as blob: URLs fetched with the token.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(settings: Settings | None = None, *, client: Client | None = None) -> FastAPI:
    """The API over `settings`' database, broker and storage."""
    settings = settings or get_settings()
    check_tokens(settings)
    client = client or Client(settings)
    metrics = ApiMetrics(lambda: _scrape_stats(settings), refresh_s=settings.api_metrics_refresh_s)
    app = FastAPI(
        title="Backdrop",
        summary="Queue-based background removal, replacement, blur and desaturation",
        version="0.1.0",
        # Swagger UI and ReDoc fetch their scripts from a CDN: opt-in only.
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    auth = BearerAuth(settings.api_tokens)
    _add_error_handlers(app)
    app.add_middleware(RequestGuard, policy=_guard_policy(settings, auth))
    # Added last, so outermost: it also counts what the guard refuses.
    _add_request_metrics(app, metrics)
    authenticated = [Depends(auth)]
    _add_job_routes(app, client, settings, metrics, authenticated)
    _add_backfill_routes(app, Backfills(settings, client.storage, client.celery), authenticated)
    _add_ops_routes(app, settings, metrics, authenticated)
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

    settings = get_settings()
    app = create_app(settings)
    host = host or settings.api_host
    port = port or settings.api_port

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_listening is not None:
                on_listening(dashboard_url(host, port))

    Server(uvicorn.Config(app, host=host, port=port)).run()


def dashboard_url(host: str, port: int) -> str:
    """The dashboard's address as a browser on this host reaches it: a server listening on
    every interface is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/dashboard"


# --- auth --------------------------------------------------------------------------------


class BearerAuth:
    """The dependency every authenticated route carries."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
        ],
    ) -> None:
        if not self._tokens:  # insecure-no-auth, refused at create_app unless chosen
            return
        if request.scope.get(VERIFIED_TOKEN):
            return  # the guard compared it already: once per request, as the timing promises
        if credentials is None:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if not self._matches(credentials.credentials.encode()):
            raise Unauthorized("invalid bearer token")

    def accepts(self, authorization: str) -> bool:
        """Whether an Authorization header carries a valid token (parsed as HTTPBearer does)."""
        scheme, credentials = get_authorization_scheme_param(authorization)
        if scheme.lower() != "bearer" or not credentials:
            return False
        return self._matches(credentials.encode("latin-1"))

    def _matches(self, given: bytes) -> bool:
        # Compare against every token, matched or not, so timing reveals neither which
        # token nor how much of one matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(given, token)
        return matched


# --- errors ------------------------------------------------------------------------------


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def status_for(exc: BackdropError) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(exc, kind)), 500)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BackdropError)
    async def backdrop_error(_request: Request, exc: BackdropError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("request failed: %s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return error_response(status, exc.code, exc.message, **headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, InvalidRequest.code, _describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal", "internal error; see the API's log")


def _describe(errors: Any) -> str:
    problems = []
    for error in errors:
        if error.get("type") == "json_invalid":
            # Its loc ends in a character offset, not a field: say so plainly.
            detail = error.get("ctx", {}).get("error", "decode error")
            problems.append(f"body: malformed JSON ({detail})")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request"


# --- request metrics ---------------------------------------------------------------------


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
        return getattr(scope["route"], "path", "unmatched")
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def _scrape_stats(settings: Settings) -> tuple[dict[str, dict[str, int]], dict[str, int] | None]:
    with session_scope(settings.database_url) as session:
        by_queue = stats.counts_by_queue(session)
    return by_queue, stats.queue_depths(settings, [])


# --- jobs --------------------------------------------------------------------------------

JobsBody = Annotated[
    Any,
    Body(
        description="One job request, or a list of them (at most api_max_batch).",
        examples=[{"input": "s3://photos/cat.jpg", "effect": "remove"}],
    ),
]


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    # Swagger UI cannot follow pydantic's local "#/$defs/…" references inside a request body.
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def _jobs_body_schema(max_batch: int) -> dict[str, Any]:
    schema = JobRequest.model_json_schema()
    one = _inline_refs(schema, schema.get("$defs", {}))
    many = {"type": "array", "items": one, "maxItems": max_batch}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": [one, many]}}},
        }
    }


def _add_job_routes(
    app: FastAPI,
    client: Client,
    settings: Settings,
    metrics: ApiMetrics,
    authenticated: list[Any],
) -> None:
    @app.post(
        "/v1/jobs",
        status_code=202,
        dependencies=authenticated,
        tags=["jobs"],
        openapi_extra=_jobs_body_schema(settings.api_max_batch),
    )
    def submit_jobs(body: JobsBody) -> JSONResponse:
        """Queue one job (→ its record) or a list of jobs (→ the list of records)."""
        requests = _parse_batch(body, settings.api_max_batch)
        records = client.submit_many(requests)
        metrics.observe_submitted(record["queue"] for record in records)
        return JSONResponse(records if isinstance(body, list) else records[0], status_code=202)

    @app.get("/v1/jobs", dependencies=authenticated, tags=["jobs"])
    def list_jobs(
        status: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: str | None = None,
    ) -> JSONResponse:
        """Jobs newest first; pass `next_cursor` back as `cursor` for the next page."""
        records, next_cursor = client.list(status=status, limit=limit, cursor=decode_cursor(cursor))
        return JSONResponse({"jobs": records, "next_cursor": encode_cursor(next_cursor)})

    @app.get("/v1/jobs/{job_id}", dependencies=authenticated, tags=["jobs"])
    def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(client.get(known_job_id(job_id)))

    @app.post("/v1/jobs/{job_id}/retry", dependencies=authenticated, tags=["jobs"])
    def retry_job(job_id: str, overwrite: bool = False) -> JSONResponse:
        """failed → queued (409 otherwise); `?overwrite=true` after an output_exists failure."""
        return JSONResponse(client.retry(known_job_id(job_id), overwrite=overwrite))

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=authenticated, tags=["jobs"])
    def cancel_job(job_id: str) -> JSONResponse:
        """queued → canceled (409 otherwise)."""
        return JSONResponse(client.cancel(known_job_id(job_id)))

    thumbnails = Thumbnails(settings.api_thumbnail_max_pixels)

    @app.get("/v1/jobs/{job_id}/thumbnail", dependencies=authenticated, tags=["jobs"])
    def job_image(job_id: str, which: Literal["input", "output"] = "output") -> Response:
        """The job's input or output image, decoded and re-encoded at most 320 px a side:
        PNG when it has transparency, else JPEG. Anything that does not decode as a PNG,
        JPEG or WebP image is 422 invalid_image; it is never served as stored."""
        record = client.get(known_job_id(job_id))
        if which == "output" and record["status"] != "succeeded":
            raise JobNotFound(f"job {job_id} has no output yet ({record['status']})")
        location = record[which]
        thumbnail = thumbnails.get(
            (location, record["attempts"], record["finished_at"]),
            lambda: client.storage.read(location, max_bytes=settings.api_thumbnail_max_bytes),
        )
        return Response(thumbnail.data, media_type=thumbnail.media_type, headers=THUMBNAIL_HEADERS)


def _parse_batch(body: Any, limit: int) -> list[JobRequest]:
    if isinstance(body, dict):
        return [parse_request(body)]
    if not isinstance(body, list):
        raise InvalidRequest("body: expected a job request object or a list of them")
    if len(body) > limit:
        raise BatchTooLarge(f"{len(body)} jobs in one request; at most {limit}")
    requests = []
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            raise InvalidRequest(f"body[{index}]: expected a job request object")
        try:
            requests.append(parse_request(item))
        except InvalidRequest as exc:
            raise InvalidRequest(f"body[{index}]: {exc.message}") from None
    return requests


def encode_cursor(cursor: str | None) -> str | None:
    """The Client's cursor, made opaque and URL-safe."""
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    """The Client's cursor back, only if it has the shape encode_cursor gives it."""
    if not cursor:
        return None
    malformed = InvalidRequest("malformed cursor; pass back a next_cursor unchanged")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise malformed
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
        _, job_id = client_module.decode_cursor(decoded) or (None, "")
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidRequest):
        raise malformed from None
    if not ID_PATTERN.fullmatch(job_id):
        raise malformed
    return decoded


def known_job_id(job_id: str) -> str:
    """`job_id` if it can name a job; anything else is 404 without asking the database."""
    if not ID_PATTERN.fullmatch(job_id):
        raise JobNotFound(f"no job with id {job_id!r:.80} (job ids are UUIDs)")
    return job_id


def known_backfill_id(backfill_id: str) -> str:
    if not ID_PATTERN.fullmatch(backfill_id):
        raise BackfillNotFound(f"no backfill with id {backfill_id!r:.80} (backfill ids are UUIDs)")
    return backfill_id


# --- backfills ----------------------------------------------------------------------------

BackfillBody = Annotated[
    Any,
    Body(
        description=(
            "source (s3://bucket/prefix, file:///prefix or a manifest .csv location), "
            "output_prefix, optional max_in_flight and dry_run, plus the job options "
            "(effect, background, classes, format, …) every photo gets."
        ),
        examples=[
            {"source": "s3://photos/2024/", "output_prefix": "s3://out/2024", "effect": "blur"}
        ],
    ),
]


def _add_backfill_routes(app: FastAPI, engine: Backfills, authenticated: list[Any]) -> None:
    """The engine runs in a daemon thread of the API process: POST returns 202 at once. If
    the API stops, the backfill stays `running` in the database; POST …/resume continues it."""

    @app.post("/v1/backfills", status_code=202, dependencies=authenticated, tags=["backfills"])
    def create_backfill(body: BackfillBody) -> JSONResponse:
        """Start a backfill (202 with its record), or with dry_run count it (200)."""
        source, output_prefix, max_in_flight, dry_run, options = _parse_backfill(body)
        if dry_run:
            counts = engine.dry_run(source, output_prefix, options)
            return JSONResponse({"dry_run": True, "counts": counts})
        record = engine.create(source, output_prefix, options, max_in_flight)
        engine.start_in_thread(record["id"])
        return JSONResponse(record, status_code=202)

    @app.get("/v1/backfills", dependencies=authenticated, tags=["backfills"])
    def list_backfills(limit: Annotated[int, Query(ge=1, le=200)] = 20) -> JSONResponse:
        return JSONResponse({"backfills": engine.list(limit)})

    @app.get("/v1/backfills/{backfill_id}", dependencies=authenticated, tags=["backfills"])
    def get_backfill(backfill_id: str) -> JSONResponse:
        return JSONResponse(engine.get(known_backfill_id(backfill_id)))

    @app.post("/v1/backfills/{backfill_id}/pause", dependencies=authenticated, tags=["backfills"])
    def pause_backfill(backfill_id: str) -> JSONResponse:
        return JSONResponse(engine.pause(known_backfill_id(backfill_id)))

    @app.post("/v1/backfills/{backfill_id}/cancel", dependencies=authenticated, tags=["backfills"])
    def cancel_backfill(backfill_id: str) -> JSONResponse:
        return JSONResponse(engine.cancel(known_backfill_id(backfill_id)))

    @app.post(
        "/v1/backfills/{backfill_id}/resume",
        status_code=202,
        dependencies=authenticated,
        tags=["backfills"],
    )
    def resume_backfill(backfill_id: str) -> JSONResponse:
        record = engine.get(known_backfill_id(backfill_id))
        if record["status"] not in ("running", "paused", "failed"):
            raise InvalidTransition(f"backfill {backfill_id} is {record['status']}")
        engine.start_in_thread(backfill_id)
        return JSONResponse(record, status_code=202)


def _parse_backfill(body: Any) -> tuple[str, str, int | None, bool, dict[str, Any]]:
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected a backfill object")
    options = dict(body)
    source, output_prefix = options.pop("source", None), options.pop("output_prefix", None)
    max_in_flight, dry_run = options.pop("max_in_flight", None), options.pop("dry_run", False)
    for name, value in (("source", source), ("output_prefix", output_prefix)):
        if not isinstance(value, str) or "://" not in value:
            # Never a plain path: the API must not read the server's own files.
            raise InvalidRequest(f"{name}: expected a location (s3://… or file:///…)")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool)
        or not isinstance(max_in_flight, int)
        or not 1 <= max_in_flight <= MAX_IN_FLIGHT
    ):
        raise InvalidRequest(f"max_in_flight: expected an integer from 1 to {MAX_IN_FLIGHT}")
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run: expected true or false")
    return source, output_prefix, max_in_flight, dry_run, options


# --- stats, metrics, health, dashboard ---------------------------------------------------


def _add_ops_routes(
    app: FastAPI, settings: Settings, metrics: ApiMetrics, authenticated: list[Any]
) -> None:
    dashboard = resources.files("producer").joinpath("dashboard.html").read_text("utf-8")

    @app.get("/v1/stats", dependencies=authenticated, tags=["ops"])
    def get_stats() -> JSONResponse:
        """Counts, throughput, latency percentiles, failures, queue depth, live workers."""
        return JSONResponse(stats.collect(settings))

    @app.get("/v1/stats/series", dependencies=authenticated, tags=["ops"])
    def get_stats_series(window: Literal["1h", "24h"] = "1h") -> JSONResponse:
        """Per-minute (1h) or per-quarter-hour (24h) throughput, queue depth and latency."""
        return JSONResponse(stats.collect_series(settings, window))

    @app.get("/metrics", tags=["ops"])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """200 when the database answers, 503 when it does not."""
        try:
            with session_scope(settings.database_url) as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # whatever the failure, the answer is "not healthy"
            log.warning("health check failed: %s", exc)
            return error_response(503, "database_unavailable", "the database does not answer")
        return JSONResponse({"status": "ok", "database": "ok"})

    @app.get("/", include_in_schema=False)
    @app.get("/dashboard", include_in_schema=False)
    def dashboard_page() -> HTMLResponse:
        return HTMLResponse(
            dashboard,
            headers={"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache"},
        )
