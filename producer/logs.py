"""Logging with the job id on every line, wherever in the call stack the line comes from.

One record is one line: what a message carries (a location, a key a backfill listed, an
error from a store) is user data, so its control characters are escaped and it cannot
start a forged line or rewrite the terminal. A traceback keeps its lines, each indented
under its record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from producer.locations import UNSAFE_CHARACTERS

_job_id: ContextVar[str] = ContextVar("job_id", default="-")

FORMAT = "%(asctime)s %(levelname)s [job=%(job_id)s] %(name)s: %(message)s"
_TRACEBACK_INDENT = "    | "


def escape(text: str) -> str:
    r"""`text` on one line: each control character as a Python escape (`\n`, `\x1b`, …)."""
    return UNSAFE_CHARACTERS.sub(lambda found: repr(found.group())[1:-1], text)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        return True


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, control characters escaped; tracebacks indented,
    so that no line of one can pass for a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        escaped = logging.makeLogRecord(record.__dict__)
        escaped.message = escape(record.message)
        escaped.job_id = escape(str(getattr(record, "job_id", "-")))
        return super().formatMessage(escaped)

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return "\n".join(_TRACEBACK_INDENT + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(_TRACEBACK_INDENT + escape(line) for line in stack_info.splitlines())


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def configure(level: str | int = "INFO") -> None:
    """Install one handler on the root logger that stamps every record with the job id."""
    root = logging.getLogger()
    for handler in root.handlers:
        if any(isinstance(f, JobIdFilter) for f in handler.filters):
            return
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    handler.addFilter(JobIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
