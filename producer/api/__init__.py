"""The HTTP API (`backdrop api`): jobs, backfills, stats, Prometheus metrics, health and the
dashboard.

Auth: every route but /healthz, /metrics, /openapi.json and the dashboard page itself needs
`Authorization: Bearer <token>` with one of BACKDROP_API_TOKENS.

- `app`: the factory (`create_app`), the token checks, the request metrics and `serve`;
- `deps`: the app state the routes read and the token dependency; `auth`: the token check;
- `errors`: one HTTP status per error class and one JSON error shape;
- `jobs`, `backfills`, `ops`: the routers.
"""

from producer.api.app import MIN_TOKEN_LENGTH, check_tokens, create_app, dashboard_url, serve
from producer.api.errors import error_response, status_for

__all__ = [
    "MIN_TOKEN_LENGTH",
    "check_tokens",
    "create_app",
    "dashboard_url",
    "error_response",
    "serve",
    "status_for",
]
