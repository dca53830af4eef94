"""/v1/jobs: submit, list, look up, retry and cancel jobs; their thumbnails.

The Client does blocking I/O (SQL, Redis, storage), so the endpoints are plain `def`s that
FastAPI runs in its threadpool. Path and query parameters are checked for shape before they
reach the database, so a hostile value is a 4xx, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from producer import client as client_module
from producer.api.deps import Authenticated, ClientDep, SettingsDep, State
from producer.client import Record
from producer.errors import (
    BatchTooLarge,
    InputNotFound,
    InvalidRequest,
    JobNotFound,
    OutputNotReady,
)
from producer.models import JobStatus
from producer.request import JobRequest, parse_request
from producer.storage import Storage, content_type_for

# Job and backfill ids are uuid4 strings; anything else cannot name one.
ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_CURSOR_LENGTH = 200
THUMBNAIL_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
# Served as stored (our own encoder wrote them), so the page it might be opened as can run
# nothing; a retry may replace the object, so no caching.
OUTPUT_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
JOB_ID_HEADER = "Backdrop-Job-Id"
MASK_CONTENT_TYPE = "image/png"

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=Authenticated)

JobsBody = Annotated[
    Any,
    Body(
        description="One job request, or a list of them (at most BACKDROP_API_MAX_BATCH).",
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


def _jobs_body_schema() -> dict[str, Any]:
    schema = JobRequest.model_json_schema()
    one = _inline_refs(schema, schema.get("$defs", {}))
    many = {"type": "array", "items": one}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": [one, many]}}},
        }
    }


@router.post("", status_code=202, openapi_extra=_jobs_body_schema())
def submit_jobs(body: JobsBody, state: State) -> JSONResponse:
    """Queue one job (→ its record) or a list of jobs (→ the list of records)."""
    requests = parse_batch(body, state.services.settings.api_max_batch)
    records = state.client.submit_many(requests)
    state.metrics.observe_submitted(record["queue"] for record in records)
    return JSONResponse(records if isinstance(body, list) else records[0], status_code=202)


@router.get("")
def list_jobs(
    client: ClientDep,
    status: str | None = None,
    output: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> JSONResponse:
    """Jobs newest first; pass `next_cursor` back as `cursor` for the next page. `output`:
    only the jobs that wrote that location (every run of a backfill photo)."""
    records, next_cursor = client.list(
        status=status, output=output, limit=limit, cursor=decode_cursor(cursor)
    )
    return JSONResponse({"jobs": records, "next_cursor": encode_cursor(next_cursor)})


@router.get("/{job_id}")
def get_job(job_id: str, client: ClientDep) -> JSONResponse:
    return JSONResponse(client.get(known_job_id(job_id)))


@router.post("/{job_id}/retry")
def retry_job(job_id: str, client: ClientDep, overwrite: bool = False) -> JSONResponse:
    """failed → queued (409 otherwise); `?overwrite=true` after an output_exists failure."""
    return JSONResponse(client.retry(known_job_id(job_id), overwrite=overwrite))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, client: ClientDep) -> JSONResponse:
    """queued → canceled (409 otherwise)."""
    return JSONResponse(client.cancel(known_job_id(job_id)))


@router.get("/{job_id}/thumbnail")
def job_image(
    job_id: str,
    state: State,
    settings: SettingsDep,
    which: Literal["input", "output"] = "output",
) -> Response:
    """The job's input or output image, decoded and re-encoded at most 320 px a side:
    PNG when it has transparency, else JPEG. Anything that does not decode as a PNG,
    JPEG or WebP image is 422 invalid_image; it is never served as stored."""
    client = state.client
    record = client.get(known_job_id(job_id))
    if which == "output" and record["status"] != "succeeded":
        raise JobNotFound(f"job {job_id} has no output yet ({record['status']})")
    location = record[which]
    thumbnail = state.thumbnails.get(
        (location, record["attempts"], record["finished_at"]),
        lambda: client.storage.read(location, max_bytes=settings.api_thumbnail_max_bytes),
    )
    return Response(thumbnail.data, media_type=thumbnail.media_type, headers=THUMBNAIL_HEADERS)


@router.get(
    "/{job_id}/output",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
def job_output(job_id: str, client: ClientDep, mask: bool = False) -> StreamingResponse:
    """A succeeded job's output image as stored (`?mask=1`: its mask, a PNG), with its
    format's Content-Type; 404 output_not_ready before it has succeeded."""
    record = client.get(known_job_id(job_id))
    if record["status"] != JobStatus.SUCCEEDED:
        raise OutputNotReady(
            f"job {job_id} is {record['status']}; its output comes once it succeeds"
        )
    if mask and record["mask_output"] is None:
        raise OutputNotReady(f"job {job_id} saved no mask (it had no mask_output)")
    return output_response(client.storage, record, mask=mask)


def output_response(storage: Storage, record: Record, *, mask: bool = False) -> StreamingResponse:
    """A succeeded job's output (or mask) streamed from storage, never held whole."""
    location = record["mask_output"] if mask else record["output"]
    media_type = MASK_CONTENT_TYPE if mask else content_type_for(record["params"]["format"])
    try:
        chunks = storage.stream(location)
    except InputNotFound:
        raise OutputNotReady(f"job {record['id']}'s output is no longer at {location}") from None
    headers = {**OUTPUT_HEADERS, JOB_ID_HEADER: record["id"]}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


def parse_batch(body: Any, limit: int) -> list[JobRequest]:
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
