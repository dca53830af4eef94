"""A backfill's progress on the terminal: a live line with rate and ETA on a TTY, a plain
line every few seconds otherwise (logs, CI)."""

from __future__ import annotations

import time
from typing import Any, TextIO

PLAIN_EVERY_S = 10.0


class ProgressLine:
    """Called with each backfill record the engine reports."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_plain = 0.0
        self._unwritten: str | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        line = describe(record, self._rate(record), self._eta(record))
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
            self._stream.flush()
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            self._write_plain(line)
        else:
            self._unwritten = line

    def close(self) -> None:
        """End the live line; without a terminal, write the last counts if not yet written."""
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
        elif self._unwritten is not None:
            self._write_plain(self._unwritten)

    def _write_plain(self, line: str) -> None:
        self._unwritten = None
        self._stream.write(line + "\n")
        self._stream.flush()

    def _rate(self, record: dict[str, Any]) -> float:
        """Photos finished per second since this run began (resumes count from their start)."""
        done = _done(record)
        if self._first_done is None:
            self._first_done = done
        elapsed = time.monotonic() - self._started
        return (done - self._first_done) / elapsed if elapsed > 0 else 0.0

    def _eta(self, record: dict[str, Any]) -> float | None:
        # Only a finished listing says how much work there is.
        rate = self._rate(record)
        if not record["listing_done"] or rate <= 0:
            return None
        counts: dict[str, int] = record["counts"]
        left = counts["submitted"] - (_done(record) - counts["skipped"])
        return max(left, 0) / rate


def _done(record: dict[str, Any]) -> int:
    counts: dict[str, int] = record["counts"]
    return counts["skipped"] + counts["succeeded"] + counts["failed"]


def describe(record: dict[str, Any], rate: float, eta_s: float | None) -> str:
    counts = record["counts"]
    eta = "?" if eta_s is None else time.strftime("%H:%M:%S", time.gmtime(eta_s))
    return (
        f"{record['status']}: listed {counts['listed']}"
        f"{'' if record['listing_done'] else '+'} · skipped {counts['skipped']} · "
        f"submitted {counts['submitted']} · succeeded {counts['succeeded']} · "
        f"failed {counts['failed']} · in flight {counts['in_flight'] or 0} · "
        f"{rate:.1f}/s · ETA {eta}"
    )
