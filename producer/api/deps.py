"""What the routes depend on: the app's state, and the bearer token every /v1 route needs.

The app factory puts one `ApiState` on `app.state`; routers are module-level and take what
they need from it per request (as the FastAPI full-stack template does), so nothing is bound
in closures and tests can build as many apps as they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.api.auth import BearerAuth
from producer.api.series import SeriesCache
from producer.backfill import BackfillRunner
from producer.client import Client
from producer.metrics import ApiMetrics
from producer.services import Services
from producer.settings import Settings
from producer.thumbnail import Thumbnails


@dataclass(frozen=True)
class ApiState:
    services: Services
    client: Client
    backfills: BackfillRunner
    metrics: ApiMetrics
    auth: BearerAuth
    thumbnails: Thumbnails
    series: SeriesCache


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.backdrop
    return state


def _settings(request: Request) -> Settings:
    return api_state(request).services.settings


def _client(request: Request) -> Client:
    return api_state(request).client


def _backfills(request: Request) -> BackfillRunner:
    return api_state(request).backfills


State = Annotated[ApiState, Depends(api_state)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ClientDep = Annotated[Client, Depends(_client)]
BackfillsDep = Annotated[BackfillRunner, Depends(_backfills)]


async def require_token(
    request: Request,
    credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
    ],
) -> None:
    """401 unless the request carries one of the configured tokens."""
    api_state(request).auth.verify(request, credentials)


Authenticated = [Depends(require_token)]
