"""/v1/backfills: start (or dry-run), list, look up, pause, cancel and resume backfills.

The engine runs in a daemon thread of the API process: POST returns 202 at once. If the API
stops, the backfill stays `running` in the database; POST …/resume continues it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from producer.api.deps import Authenticated, BackfillsDep
from producer.api.jobs import ID_PATTERN
from producer.backfill import MAX_IN_FLIGHT
from producer.errors import BackfillNotFound, InvalidTransition
from producer.models import BackfillStatus

router = APIRouter(prefix="/v1/backfills", tags=["backfills"], dependencies=Authenticated)


class BackfillRequest(BaseModel):
    """source, output_prefix, optional max_in_flight and dry_run, plus the job options
    (effect, background, classes, format, …) every photo gets; the engine validates those."""

    model_config = ConfigDict(extra="allow")

    source: str = Field(description="s3://bucket/prefix, file:///prefix or a manifest .csv")
    output_prefix: str
    max_in_flight: StrictInt | None = Field(default=None, ge=1, le=MAX_IN_FLIGHT)
    dry_run: StrictBool = False

    @field_validator("source", "output_prefix")
    @classmethod
    def _a_location(cls, value: str) -> str:
        if "://" not in value:
            # Never a plain path: the API must not read the server's own files.
            raise ValueError("expected a location (s3://… or file:///…)")
        return value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


BackfillBody = Annotated[
    BackfillRequest,
    Body(
        examples=[
            {"source": "s3://photos/2024/", "output_prefix": "s3://out/2024", "effect": "blur"}
        ]
    ),
]


@router.post("", status_code=202)
def create_backfill(body: BackfillBody, engine: BackfillsDep) -> JSONResponse:
    """Start a backfill (202 with its record), or with dry_run count it (200)."""
    if body.dry_run:
        counts = engine.dry_run(body.source, body.output_prefix, body.options)
        return JSONResponse({"dry_run": True, "counts": counts})
    record = engine.create(body.source, body.output_prefix, body.options, body.max_in_flight)
    engine.start_in_thread(record["id"])
    return JSONResponse(record, status_code=202)


@router.get("")
def list_backfills(
    engine: BackfillsDep, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> JSONResponse:
    return JSONResponse({"backfills": engine.list(limit)})


@router.get("/{backfill_id}")
def get_backfill(backfill_id: str, engine: BackfillsDep) -> JSONResponse:
    return JSONResponse(engine.get(known_backfill_id(backfill_id)))


@router.post("/{backfill_id}/pause")
def pause_backfill(backfill_id: str, engine: BackfillsDep) -> JSONResponse:
    return JSONResponse(engine.pause(known_backfill_id(backfill_id)))


@router.post("/{backfill_id}/cancel")
def cancel_backfill(backfill_id: str, engine: BackfillsDep) -> JSONResponse:
    return JSONResponse(engine.cancel(known_backfill_id(backfill_id)))


@router.post("/{backfill_id}/resume", status_code=202)
def resume_backfill(backfill_id: str, engine: BackfillsDep) -> JSONResponse:
    record = engine.get(known_backfill_id(backfill_id))
    if not BackfillStatus(record["status"]).resumable:
        raise InvalidTransition(f"backfill {backfill_id} is {record['status']}")
    engine.start_in_thread(backfill_id)
    return JSONResponse(record, status_code=202)


def known_backfill_id(backfill_id: str) -> str:
    if not ID_PATTERN.fullmatch(backfill_id):
        raise BackfillNotFound(f"no backfill with id {backfill_id!r:.80} (backfill ids are UUIDs)")
    return backfill_id
