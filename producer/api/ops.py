"""Operations: stats and their chart series, Prometheus metrics, health and the dashboard.

/metrics, /healthz and the dashboard page need no token; the page holds no data, and its
script calls the authenticated endpoints with a token it takes from the URL fragment
(`/dashboard#token=…`, never sent to the server, so never in access logs) or from a prompt.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from producer import stats
from producer.api.deps import Authenticated, SettingsDep, State
from producer.api.errors import error_response
from producer.db import session_scope

log = logging.getLogger(__name__)

# Inline script and style only; thumbnails arrive as blob: URLs fetched with the token.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)

router = APIRouter(tags=["ops"])


@router.get("/v1/stats", dependencies=Authenticated)
def get_stats(settings: SettingsDep) -> JSONResponse:
    """Counts, throughput, latency percentiles, failures, queue depth, live workers."""
    return JSONResponse(stats.collect(settings))


@router.get("/v1/stats/series", dependencies=Authenticated)
def get_stats_series(state: State, window: Literal["1h", "24h"] = "1h") -> JSONResponse:
    """Per-minute (1h) or per-quarter-hour (24h) throughput, queue depth and latency; read
    at most every BACKDROP_API_SERIES_REFRESH_S (24h: six times that)."""
    return JSONResponse(state.series.get(window))


@router.get("/metrics")
def prometheus_metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
def healthz(settings: SettingsDep) -> JSONResponse:
    """200 when the database answers, 503 when it does not."""
    try:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # whatever the failure, the answer is "not healthy"
        log.warning("health check failed: %s", exc)
        return error_response(503, "database_unavailable", "the database does not answer")
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/", include_in_schema=False)
@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse(
        _dashboard(),
        headers={"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache"},
    )


@cache
def _dashboard() -> str:
    return resources.files("producer").joinpath("dashboard.html").read_text("utf-8")
