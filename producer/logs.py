"""Logging with the job id on every line, wherever in the call stack the line comes from."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_job_id: ContextVar[str] = ContextVar("job_id", default="-")

FORMAT = "%(asctime)s %(levelname)s [job=%(job_id)s] %(name)s: %(message)s"


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        return True


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
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(JobIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
