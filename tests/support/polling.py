"""Waiting on a condition with a deadline: the one way tests and bench scripts synchronise
(never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_until(condition: Callable[[], object], *, timeout: float, what: str) -> None:
    """Return once `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
