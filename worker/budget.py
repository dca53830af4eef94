"""The memory budget: decoded pixels admitted against a per-process share of memory.

A photo's compressed size says nothing about what decoding it costs: a 300 KB PNG can hold
100 MP, about 4.5 GB once decoded and worked on. A worker runs many job threads, so a few
such files at once would exceed its memory limit and get it killed (and the jobs redelivered
to the next worker, and killed again). Each job reserves what its imaging will need, computed
from the image headers before any pixel is decoded; jobs that do not fit wait their turn, in
arrival order, and a job that could never fit fails `input_too_large` at once.

A job reserves everything it needs in one go and releases it when its imaging is done, so no
job ever holds part of the budget while waiting for more: nothing can deadlock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from producer.errors import InputTooLarge
from producer.settings import Settings

log = logging.getLogger(__name__)

MB = 1024 * 1024
# Peak resident memory of one job's imaging above the worker's idle size, measured on this
# project's pipeline (decode, refine, decontaminate, composite, encode; every effect; 3 to
# 16 MP photos): about 55 MB plus 41 bytes per photo pixel, 4 per pixel of a coarse mask and
# 10 per pixel of a background while it decodes. Rounded up: in a worker, a 16 MP photo with
# a 16 MP mask peaked at 946 MB above idle (tests/test_budget.py), this estimates 960 MB.
FIXED_BYTES = 64 * MB
PHOTO_BYTES_PER_PIXEL = 48
MASK_BYTES_PER_PIXEL = 8
BACKGROUND_BYTES_PER_PIXEL = 12
# The default budget's share of the memory limit: the rest is the model, torch and Python.
MEMORY_SHARE = 0.5
CGROUP_LIMITS = ("memory.max", "memory/memory.limit_in_bytes")  # cgroup v2, v1


class Expired(Exception):
    """A reservation waited past its timeout."""


def need_bytes(
    photo: tuple[int, int],
    *,
    mask: tuple[int, int] | None = None,
    background: tuple[int, int] | None = None,
) -> int:
    """What one job's imaging needs, from the (width, height) of its images."""

    def pixels(size: tuple[int, int] | None) -> int:
        return size[0] * size[1] if size else 0

    return (
        FIXED_BYTES
        + pixels(photo) * PHOTO_BYTES_PER_PIXEL
        + pixels(mask) * MASK_BYTES_PER_PIXEL
        + pixels(background) * BACKGROUND_BYTES_PER_PIXEL
    )


def memory_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """This process's memory limit: its cgroup's (v2, then v1), else the machine's memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in CGROUP_LIMITS:
        try:
            text = (cgroup / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # v2 writes "max" for none; v1 a number beyond any machine
            return min(int(text), physical)
    return physical


def capacity_bytes(settings: Settings, *, limit: int | None = None) -> int:
    """BACKDROP_MEMORY_BUDGET_MB, else MEMORY_SHARE of the memory limit."""
    if settings.memory_budget_mb:
        return settings.memory_budget_mb * MB
    return int(MEMORY_SHARE * (limit if limit is not None else memory_limit()))


class Reservation:
    """Memory held by one job until it leaves the `with` block."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._budget.release(self.size)


class MemoryBudget:
    """A counting semaphore over bytes, first come first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._changed = threading.Condition()
        self._queue: deque[object] = deque()  # one ticket per waiting reservation, in order

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    def reserve(self, size: int, *, timeout: float, what: str = "it") -> Reservation:
        """Hold `size` bytes, waiting behind earlier reservations for up to `timeout` seconds.

        InputTooLarge if `size` exceeds the whole budget (waiting could never help: `what`
        names the image in its message); Expired if the timeout passes first.
        """
        if size > self.capacity:
            raise InputTooLarge(
                f"{what} needs about {size / MB:,.0f} MB of memory to process; this worker's"
                f" budget is {self.capacity / MB:,.0f} MB (BACKDROP_MEMORY_BUDGET_MB)"
            )
        deadline = time.monotonic() + timeout
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                if not self._admits(ticket, size):
                    log.info(
                        "waiting for %.0f MB of the memory budget (%.0f of %.0f MB free, %d ahead)",
                        size / MB,
                        self._free / MB,
                        self.capacity / MB,
                        len(self._queue) - 1,
                    )
                while not self._admits(ticket, size):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Expired(f"waited {timeout:.0f}s for {size / MB:,.0f} MB of memory")
                    self._changed.wait(remaining)
                self._free -= size
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now (or the one behind a reservation that gave up).
                self._changed.notify_all()
        return Reservation(self, size)

    def release(self, size: int) -> None:
        with self._changed:
            self._free += size
            self._changed.notify_all()

    def _admits(self, ticket: object, size: int) -> bool:
        return self._queue[0] is ticket and self._free >= size
