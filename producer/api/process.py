"""POST /v1/process: upload a photo, wait for its job, get the image back.

The upload is parsed as it streams in, into a temporary file (in memory up to 1 MiB, then on
disk) and counted: past BACKDROP_MAX_INPUT_BYTES the request is refused (413
input_too_large) before the rest is read, and nothing is stored. The job is validated and
submitted as POST /v1/jobs would (same fields, same checks), on the interactive queue, with
the photo stored under BACKDROP_INPUT_PREFIX at a fresh key. The answer waits for the job's
final state, polling its status with backoff for at most `timeout` seconds, on the event
loop (no thread held while waiting).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from functools import cache
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from producer.api.deps import ApiState, Authenticated, State
from producer.api.errors import error_response, status_for_code
from producer.api.jobs import JOB_ID_HEADER, output_response
from producer.client import Record
from producer.errors import InputTooLarge, InvalidRequest, InvalidTransition
from producer.models import JobStatus
from producer.request import JobRequest, Queue
from producer.storage import join

PATH = "/v1/process"
IMAGE_FIELD = "image"
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
# Room for the job fields and the multipart framing around the image.
FORM_ALLOWANCE_BYTES = 64 * 1024
MAX_FIELDS = 32
# The first look comes soon (a small photo on an idle worker takes a fraction of a second);
# later ones back off, so a long wait costs a read every fifth of a second at most.
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.2
POLL_GROWTH = 1.5
UPLOAD_FOLDER = "uploads"
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")

router = APIRouter(tags=["jobs"], dependencies=Authenticated)


@router.post(
    PATH,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        202: {"description": "Not done within `timeout`: the job record"},
    },
)
async def process_photo(request: Request, state: State) -> Response:
    """Upload an image (multipart: an `image` file part, job fields as form fields, `timeout`
    seconds to wait, default 30) and get the result: the image with header Backdrop-Job-Id,
    202 with the job record if it is not done in time, or the job's error if it failed."""
    max_bytes = state.services.settings.max_input_bytes
    form = await _read_form(request, max_bytes)
    try:
        image, fields, timeout = _parse_form(form, max_bytes)
        record = await run_in_threadpool(_submit, state, image, fields)
    finally:
        await form.close()
    final = await _wait_for(request, state, record["id"], timeout)
    if final is None:
        pending = await run_in_threadpool(state.client.get, record["id"])
        return JSONResponse(pending, status_code=202, headers={JOB_ID_HEADER: record["id"]})
    return await run_in_threadpool(_answer, state, final)


async def _read_form(request: Request, max_bytes: int) -> FormData:
    limit = max_bytes + FORM_ALLOWANCE_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("expected a multipart/form-data body with an `image` file part")
    parser = MultiPartParser(
        request.headers, _capped(request.stream(), limit, max_bytes), max_fields=MAX_FIELDS
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from None


async def _capped(
    chunks: AsyncIterator[bytes], limit: int, max_bytes: int
) -> AsyncGenerator[bytes, None]:
    """The body's chunks until they pass `limit` bytes: then InputTooLarge, the rest unread."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise _too_large(max_bytes)
        yield chunk


def _too_large(max_bytes: int) -> InputTooLarge:
    return InputTooLarge(f"the image is over BACKDROP_MAX_INPUT_BYTES ({max_bytes} bytes)")


def _parse_form(form: FormData, max_bytes: int) -> tuple[UploadFile, dict[str, Any], float]:
    image = form.get(IMAGE_FIELD)
    if not isinstance(image, UploadFile):
        raise InvalidRequest(f"{IMAGE_FIELD}: expected a file part")
    if image.size is not None and image.size > max_bytes:
        raise _too_large(max_bytes)
    fields: dict[str, Any] = {}
    for name in {key for key in form if key != IMAGE_FIELD}:
        values = form.getlist(name)
        if any(not isinstance(value, str) for value in values):
            raise InvalidRequest(f"{name}: expected a form field, not a file")
        fields[name] = _field_value(name, [str(value) for value in values])
    for given in ("input", "queue"):
        if given in fields:
            raise InvalidRequest(f"{given}: set by /v1/process (the upload, the interactive queue)")
    return image, fields, _timeout(fields.pop("timeout", DEFAULT_TIMEOUT_S))


def _field_value(name: str, values: list[str]) -> Any:
    """A form field as its JSON value would be: numbers and booleans parsed, lists from
    repeated fields (or commas), text as it is. Unknown names pass through for the request
    model to refuse."""
    kinds = _field_kinds().get(name, set())
    if "array" in kinds:
        return [part.strip() for value in values for part in value.split(",") if part.strip()]
    if len(values) > 1:
        raise InvalidRequest(f"{name}: given more than once")
    if name == "timeout" or kinds & {"boolean", "integer", "number"}:
        try:
            return json.loads(values[0])
        except ValueError:
            raise InvalidRequest(f"{name}: expected a number or true/false") from None
    return values[0]


@cache
def _field_kinds() -> dict[str, set[str]]:
    """Each job field's JSON types, from the request model's schema."""
    kinds: dict[str, set[str]] = {}
    for name, schema in JobRequest.model_json_schema()["properties"].items():
        options = schema.get("anyOf", [schema])
        kinds[name] = {option["type"] for option in options if "type" in option}
    return kinds


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("timeout: expected a number of seconds")
    if not 0 <= value <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout: expected 0 to {MAX_TIMEOUT_S:.0f} seconds")
    return float(value)


def _submit(state: ApiState, image: UploadFile, fields: dict[str, Any]) -> Record:
    """Validate the request, and only then store the photo and queue its job."""
    settings = state.services.settings
    name = f"{UPLOAD_FOLDER}/{uuid.uuid4()}{_suffix(image.filename)}"
    location = join(settings.input_prefix, name)
    request = state.client.validate(fields | {"input": location, "queue": Queue.INTERACTIVE.value})
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    image.file.seek(0)
    state.client.storage.write(location, image.file, content_type=content_type)
    (record,) = state.client.submit_many([request])
    state.metrics.observe_submitted([record["queue"]])
    return record


def _suffix(filename: str | None) -> str:
    suffix = PurePosixPath(filename or "").suffix.lower()
    return suffix if _SUFFIX.fullmatch(suffix) else ""


async def _wait_for(
    request: Request, state: ApiState, job_id: str, timeout: float
) -> Record | None:
    """The job's final record, or None after `timeout` seconds (or once the caller has gone:
    the job runs on, its result is in its record)."""
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_S
    while True:
        record = await run_in_threadpool(state.client.finished, job_id)
        left = deadline - time.monotonic()
        if record is not None or left <= 0 or await request.is_disconnected():
            return record
        await asyncio.sleep(min(delay, left))
        delay = min(delay * POLL_GROWTH, POLL_MAX_S)


def _answer(state: ApiState, record: Record) -> Response:
    job_id = record["id"]
    if record["status"] == JobStatus.SUCCEEDED:
        return output_response(state.client.storage, record)
    if record["status"] == JobStatus.CANCELED:
        exc = InvalidTransition(f"job {job_id} was canceled before it ran")
        return error_response(409, exc.code, exc.message, **{JOB_ID_HEADER: job_id})
    error = record["error"] or {"code": "internal", "message": "failed without an error"}
    return error_response(
        status_for_code(error["code"]), error["code"], error["message"], **{JOB_ID_HEADER: job_id}
    )
