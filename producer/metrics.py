"""Prometheus metrics: the API's (one registry per app) and the workers' (the process-wide
default registry, served by `start_worker_metrics_server`).

Worker metrics live here, not in `worker/`, so their names are defined once next to the API's
and the producer image can document them without importing torch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds: a cached-model segmentation takes tens of ms, a 12 MP CPU inference many seconds.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- worker metrics (default registry) -----------------------------------------------------

WORKER_JOBS_FINISHED = Counter(
    "backdrop_worker_jobs_finished",
    "Jobs a worker finished, by outcome (succeeded|failed|retrying) and error code",
    ["outcome", "code"],
)
WORKER_STAGE_SECONDS = Histogram(
    "backdrop_worker_stage_seconds",
    "Time a job spent in each stage (download, decode, segment, composite, upload, …)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
WORKER_JOB_SECONDS = Histogram(
    "backdrop_worker_job_seconds",
    "Sum of a finished job's stage times",
    buckets=STAGE_BUCKETS,
)
WORKER_BATCH_SIZE = Histogram(
    "backdrop_worker_batch_size",
    "Images per model forward pass",
    buckets=BATCH_BUCKETS,
)
WORKER_IN_FLIGHT = Gauge("backdrop_worker_jobs_in_flight", "Jobs this worker is running now")


def start_worker_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve the worker's metrics on `host`:`port` from a daemon thread."""
    start_http_server(port, addr=host)
    log.info("worker metrics on %s:%d/metrics", host, port)


def record_job(outcome: str, code: str | None, timings_ms: Mapping[str, float]) -> None:
    """Count one finished job attempt and observe its stage durations."""
    WORKER_JOBS_FINISHED.labels(outcome=outcome, code=code or "").inc()
    for stage, ms in timings_ms.items():
        WORKER_STAGE_SECONDS.labels(stage=stage).observe(ms / 1000)
    if timings_ms:
        WORKER_JOB_SECONDS.observe(sum(timings_ms.values()) / 1000)


def record_batch(size: int) -> None:
    WORKER_BATCH_SIZE.observe(size)


@contextmanager
def job_in_flight() -> Iterator[None]:
    """Wrap one job attempt: the in-flight gauge counts it until it leaves, however it leaves."""
    WORKER_IN_FLIGHT.inc()
    try:
        yield
    finally:
        WORKER_IN_FLIGHT.dec()


# --- API metrics (a registry per app, so tests and multiple apps never collide) -----------


StoreReading = tuple[dict[str, dict[str, int]], dict[str, int] | None]


class ScrapeCollector(Collector):
    """Gauges read from the job store and broker, at most once per `max_age_s`.

    /metrics needs no token, and counting jobs by status is an aggregate over the whole jobs
    table: read at every scrape, anyone could keep the database busy. So scrapes within
    `max_age_s` of the last read share its result, and concurrent scrapes wait for the one
    read in progress instead of starting their own.
    """

    def __init__(
        self,
        read: Callable[[], StoreReading],
        *,
        max_age_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: StoreReading | None = None
        self._read_at: float | None = None

    def reading(self) -> StoreReading | None:
        """The last reading if still fresh, else a new one; None while the store fails."""
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self._max_age_s:
                # Failures are kept as long as successes: a down database is not hammered.
                self._read_at = now
                try:
                    self._last = self._read()
                except Exception as exc:  # a scrape must not fail because the database is down
                    log.warning("scrape-time stats unavailable: %s", exc)
                    self._last = None
            return self._last

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "backdrop_jobs", "Jobs by queue and status", labels=["queue", "status"]
        )
        depth = GaugeMetricFamily(
            "backdrop_queue_depth", "Messages waiting in the broker per queue", labels=["queue"]
        )
        reading = self.reading()
        if reading is None:
            return [jobs, depth]
        by_queue, depths = reading
        for queue, counts in by_queue.items():
            for status, count in counts.items():
                jobs.add_metric([queue, status], count)
        for queue, count in (depths or {}).items():
            depth.add_metric([queue], count)
        return [jobs, depth]


class ApiMetrics:
    def __init__(
        self,
        read_stats: Callable[[], StoreReading],
        *,
        refresh_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "backdrop_api_requests",
            "HTTP requests by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "backdrop_api_request_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.submitted = Counter(
            "backdrop_api_jobs_submitted",
            "Jobs accepted by POST /v1/jobs, by queue (idempotent resubmissions included)",
            ["queue"],
            registry=self.registry,
        )
        self.registry.register(ScrapeCollector(read_stats, max_age_s=refresh_s, clock=clock))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(seconds)

    def observe_submitted(self, queues: Iterable[str]) -> None:
        for queue, count in collections.Counter(queues).items():
            self.submitted.labels(queue=queue).inc(count)
