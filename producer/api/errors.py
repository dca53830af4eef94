"""Errors as HTTP answers: one status per error class, one JSON shape for every failure.

`{"error": {"code": …, "message": …}}`, whatever failed: our own errors (their `code`),
request validation (invalid_request), routing (not_found, method_not_allowed) and anything
unexpected (internal, logged here, never its details in the answer).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.errors import (
    AccessDenied,
    BackdropError,
    BackfillNotFound,
    BackgroundNotFound,
    BatchTooLarge,
    InputNotFound,
    InputTooLarge,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    OutputNotReady,
    PermanentError,
    TransientError,
    Unauthorized,
)

log = logging.getLogger(__name__)

# First match wins, so subclasses come before their bases.
ERROR_STATUS: tuple[tuple[type[BackdropError], int], ...] = (
    (Unauthorized, 401),
    (AccessDenied, 403),
    (JobNotFound, 404),
    (BackfillNotFound, 404),
    (InputNotFound, 404),
    (BackgroundNotFound, 404),
    (OutputNotReady, 404),
    (InvalidTransition, 409),
    (BatchTooLarge, 413),
    (InputTooLarge, 413),
    (PermanentError, 422),
    (TransientError, 503),
)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def status_for(exc: BackdropError) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(exc, kind)), 500)


def status_for_code(code: str) -> int:
    """The status of a failed job's error code (the record keeps the code, not the error)."""
    pending: list[type[BackdropError]] = [BackdropError]
    while pending:
        kind = pending.pop()
        if kind.code == code:
            return status_for(kind.__new__(kind))
        pending += kind.__subclasses__()
    return 500


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BackdropError, _backdrop_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _backdrop_error(_request: Request, exc: BackdropError) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        log.warning("request failed: %s", exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return error_response(status, exc.code, exc.message, **headers)


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, InvalidRequest.code, describe(exc.errors()))


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal", "internal error; see the API's log")


def describe(errors: Any) -> str:
    """pydantic's validation errors as one line: `field: problem; …`."""
    problems = []
    for error in errors:
        if error.get("type") == "json_invalid":
            # Its loc ends in a character offset, not a field: say so plainly.
            detail = error.get("ctx", {}).get("error", "decode error")
            problems.append(f"body: malformed JSON ({detail})")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        # Our own validators' messages, without the prefix pydantic gives them.
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems) or "invalid request"
