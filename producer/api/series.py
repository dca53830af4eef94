"""The dashboard's chart series, read from the database at most once per refresh interval.

A day's series aggregates every job of the last 24 h (~3 s at 500k jobs): read per request,
a dashboard left open, or a few of them, would keep the database busy. As with the scrape
statistics (`producer/metrics.py`), requests within the refresh interval share the last
reading, and concurrent requests wait for the one read in progress instead of starting
their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Series = dict[str, Any]
# The 24 h window's buckets are 15 minutes long (1 h: 1 minute): it may be older.
DAY_AGE_FACTOR = 6


class SeriesCache:
    def __init__(
        self,
        read: Callable[[str], Series],
        *,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age = {"1h": max_age_s, "24h": max_age_s * DAY_AGE_FACTOR}
        self._clock = clock
        self._locks = {window: threading.Lock() for window in self._max_age}
        self._last: dict[str, tuple[float, Series]] = {}

    def get(self, window: str) -> Series:
        """The window's series, read again only once the last reading is too old. A failed
        read raises and is not kept: the next request tries again."""
        with self._locks[window]:
            now = self._clock()
            last = self._last.get(window)
            if last is None or now - last[0] >= self._max_age[window]:
                last = (now, self._read(window))
                self._last[window] = last
            return last[1]
