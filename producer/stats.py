"""Operational statistics: job counts, throughput, latency percentiles, failures, queue depth
and live workers, for `backdrop stats`, `GET /v1/stats`, the dashboard and /metrics.

Counts come from SQL aggregates. Percentiles are computed in Python over a bounded sample of
recent jobs, which works the same on SQLite and PostgreSQL (and `timings_ms` is a JSON column
that neither dialect aggregates portably). Broker and worker probes never raise: an
unreachable broker is reported as null with a note, so stats stay available during an outage.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, case, cast, func, or_, select
from sqlalchemy.orm import Session

from producer.broker import QUEUE_NAMES
from producer.db import session_scope
from producer.models import Job, JobStatus, iso, utc
from producer.settings import Settings

log = logging.getLogger(__name__)

LATENCY_WINDOW = timedelta(hours=1)
LATENCY_SAMPLE = 5000
WORKER_SEEN_WINDOW = timedelta(minutes=5)
PING_TIMEOUT_S = 0.5
BROKER_TIMEOUT_S = 1.0
PERCENTILES = {"p50": 50.0, "p95": 95.0}
# Kombu's Redis transport keeps a message of priority p > 0 in the list "<queue>\x06\x16<p>".
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)

Stats = dict[str, Any]


def collect(
    settings: Settings,
    *,
    now: datetime | None = None,
    ping: bool = True,
) -> Stats:
    """Everything the ops views show, as a JSON-ready dict."""
    moment = now or datetime.now(UTC)
    notes: list[str] = []
    with session_scope(settings.database_url) as session:
        by_queue = counts_by_queue(session)
        result: Stats = {
            "generated_at": moment.isoformat(),
            "jobs": {
                "by_status": _sum_queues(by_queue),
                "by_queue": by_queue,
            },
            "throughput": throughput(session, moment),
            "latency_ms": latency(session, moment),
            "failures_by_code": failures_by_code(session),
            "workers": {"seen": workers_seen(session, moment), "pinged": None},
        }
    result["jobs"]["total"] = sum(result["jobs"]["by_status"].values())
    result["queue_depth"] = queue_depths(settings, notes)
    if ping:
        result["workers"]["pinged"] = ping_workers(settings, notes)
    result["notes"] = notes
    return result


def _zeros() -> dict[str, int]:
    return {status.value: 0 for status in JobStatus}


def counts_by_queue(session: Session) -> dict[str, dict[str, int]]:
    """Jobs per queue × status; both known queues present even when empty."""
    counts: dict[str, dict[str, int]] = {queue: _zeros() for queue in QUEUE_NAMES}
    query = select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status)
    for queue, status, count in session.execute(query):
        counts.setdefault(queue, _zeros())[status] = count
    return counts


def _sum_queues(by_queue: dict[str, dict[str, int]]) -> dict[str, int]:
    totals = _zeros()
    for per_status in by_queue.values():
        for status, count in per_status.items():
            totals[status] = totals.get(status, 0) + count
    return totals


def throughput(session: Session, now: datetime) -> dict[str, int]:
    """Jobs that finished (succeeded or failed; cancellations are not work done)."""
    done = Job.status.in_([JobStatus.SUCCEEDED.value, JobStatus.FAILED.value])

    def finished_since(delta: timedelta) -> int:
        query = select(func.count()).where(done, Job.finished_at >= now - delta)
        return session.scalar(query) or 0

    return {
        "last_minute": finished_since(timedelta(minutes=1)),
        "last_hour": finished_since(timedelta(hours=1)),
    }


def latency(session: Session, now: datetime) -> dict[str, Any]:
    """p50/p95 of end-to-end latency (finished − created) and of each stage, over the
    succeeded jobs of the last hour, at most the LATENCY_SAMPLE most recent."""
    query = (
        select(Job.created_at, Job.finished_at, Job.timings_ms)
        .where(
            Job.status == JobStatus.SUCCEEDED.value,
            Job.finished_at >= now - LATENCY_WINDOW,
        )
        .order_by(Job.finished_at.desc())
        .limit(LATENCY_SAMPLE)
    )
    end_to_end: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    for created_at, finished_at, timings in session.execute(query):
        assert finished_at is not None  # the WHERE compares it with a moment
        end_to_end.append((utc(finished_at) - utc(created_at)).total_seconds() * 1000)
        for stage, ms in (timings or {}).items():
            if isinstance(ms, int | float):
                stages[stage].append(float(ms))
    return {
        "window_s": int(LATENCY_WINDOW.total_seconds()),
        "sample_size": len(end_to_end),
        "end_to_end": _percentiles(end_to_end),
        "stages": {stage: _percentiles(values) for stage, values in sorted(stages.items())},
    }


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {name: percentile(ordered, q) for name, q in PERCENTILES.items()}


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return round(value, 3)


def failures_by_code(session: Session) -> dict[str, int]:
    """Currently failed jobs per error code (a retried job leaves the count)."""
    query = (
        select(Job.error_code, func.count())
        .where(Job.status == JobStatus.FAILED.value)
        .group_by(Job.error_code)
    )
    counts = {code or "unknown": count for code, count in session.execute(query)}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def workers_seen(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Workers with a running job, or that started or finished one in the last few minutes."""
    last_seen = func.max(func.coalesce(Job.finished_at, Job.started_at))
    query = (
        select(Job.worker, last_seen, func.count())
        .where(
            Job.worker.is_not(None),
            or_(
                Job.status == JobStatus.RUNNING.value,
                func.coalesce(Job.finished_at, Job.started_at) >= now - WORKER_SEEN_WINDOW,
            ),
        )
        .group_by(Job.worker)
        .order_by(Job.worker)
    )
    return [
        {"name": name, "last_seen": iso(seen), "recent_jobs": count}
        for name, seen, count in session.execute(query)
    ]


def queue_depths(settings: Settings, notes: list[str]) -> dict[str, int] | None:
    """Messages waiting per queue; None (with a note) when the broker cannot be asked."""
    try:
        if settings.embedded_broker:
            return _folder_depths(settings.broker_folder / "queue")
        if settings.broker_url.startswith(("redis://", "rediss://")):
            return _redis_depths(settings.broker_url)
        notes.append(f"queue depth: unsupported broker {settings.broker_url.split(':', 1)[0]}")
    except Exception as exc:  # any broker failure: stats must still answer
        log.warning("queue depth unavailable: %s", exc)
        notes.append(f"queue depth unavailable: {type(exc).__name__}: {exc}")
    return None


def _folder_depths(folder: Path) -> dict[str, int]:
    # Kombu's filesystem transport names each message file "<ms>_<uuid>.<queue>.msg".
    depths = dict.fromkeys(QUEUE_NAMES, 0)
    if folder.is_dir():
        for path in folder.iterdir():
            parts = path.name.rsplit(".", 2)
            if len(parts) == 3 and parts[2] == "msg" and parts[1] in depths:
                depths[parts[1]] += 1
    return depths


def _redis_depths(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
    )
    try:
        pipe = client.pipeline(transaction=False)
        for queue in QUEUE_NAMES:
            pipe.llen(queue)
            for step in KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{KOMBU_PRIORITY_SEP}{step}")
        lengths = pipe.execute()
    finally:
        client.close()
    per_queue = 1 + len(KOMBU_PRIORITY_STEPS)
    return {
        queue: sum(lengths[i * per_queue : (i + 1) * per_queue])
        for i, queue in enumerate(QUEUE_NAMES)
    }


def ping_workers(settings: Settings, notes: list[str]) -> list[str] | None:
    """Names of the Celery workers answering a ping within PING_TIMEOUT_S; None when the
    broker cannot broadcast (the embedded folder broker) or is unreachable."""
    if settings.embedded_broker:
        return None
    from producer.broker import make_celery

    app = make_celery(settings)
    try:
        replies = app.control.inspect(timeout=PING_TIMEOUT_S).ping() or {}
        return sorted(replies)
    except Exception as exc:  # a ping is a nicety: never fail stats over it
        log.warning("worker ping failed: %s", exc)
        notes.append(f"worker ping failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        app.close()


def format_stats(stats: Stats) -> str:
    """The readable table `backdrop stats` prints."""
    statuses = [status.value for status in JobStatus]
    lines = [f"{'queue':12}" + "".join(f"{s:>11}" for s in statuses)]
    for queue, counts in stats["jobs"]["by_queue"].items():
        lines.append(f"{queue:12}" + "".join(f"{counts.get(s, 0):>11}" for s in statuses))
    by_status = stats["jobs"]["by_status"]
    lines.append(f"{'total':12}" + "".join(f"{by_status.get(s, 0):>11}" for s in statuses))
    lines.append("")
    flow = stats["throughput"]
    minute, hour = flow["last_minute"], flow["last_hour"]
    lines.append(f"finished     {minute} in the last minute, {hour} in the last hour")
    depth = stats["queue_depth"]
    shown = ", ".join(f"{q} {n}" for q, n in depth.items()) if depth is not None else "unknown"
    lines.append(f"queue depth  {shown}")
    lat = stats["latency_ms"]
    lines.append(f"latency ms   over {lat['sample_size']} succeeded jobs of the last hour")
    lines.append(f"  {'end_to_end':18}{_pair(lat['end_to_end'])}")
    for stage, values in lat["stages"].items():
        lines.append(f"  {stage:18}{_pair(values)}")
    failures = stats["failures_by_code"]
    lines.append("failures     " + (", ".join(f"{c} {n}" for c, n in failures.items()) or "none"))
    workers = stats["workers"]
    seen = ", ".join(w["name"] for w in workers["seen"]) or "none"
    lines.append(f"workers      seen in the last 5 min: {seen}")
    if workers["pinged"] is not None:
        lines.append(f"             answering ping: {', '.join(workers['pinged']) or 'none'}")
    lines.extend(f"note: {note}" for note in stats["notes"])
    return "\n".join(lines)


def _pair(values: dict[str, float | None]) -> str:
    return "  ".join(
        f"{name} {value:>10.1f}" if value is not None else f"{name} {'-':>10}"
        for name, value in values.items()
    )


# --- time series for the dashboard's charts ----------------------------------------------

# window name → (length, bucket): 60 one-minute buckets, or 96 of a quarter hour.
SERIES_WINDOWS: dict[str, tuple[timedelta, timedelta]] = {
    "1h": (timedelta(hours=1), timedelta(minutes=1)),
    "24h": (timedelta(hours=24), timedelta(minutes=15)),
}
OUTCOMES = ("succeeded", "failed", "no_subject", "canceled")
_FINAL = [status.value for status in JobStatus if status.final]
# Latencies are counted into geometric bins 25% apart (5 ms to ~2 days) in SQL, so a window
# of half a million jobs sends back a few hundred rows; a percentile is then exact to its bin.
LATENCY_BIN_RATIO = 1.25
LATENCY_EDGES_MS: tuple[float, ...] = tuple(5.0 * LATENCY_BIN_RATIO**i for i in range(80))


def collect_series(settings: Settings, window: str, *, now: datetime | None = None) -> Stats:
    """The dashboard's charts over the last `window` ("1h" or "24h")."""
    with session_scope(settings.database_url) as session:
        return series(session, window, now or datetime.now(UTC))


def series(session: Session, window: str, now: datetime) -> Stats:
    """Per-bucket throughput by outcome (jobs/min), queue depth per queue at each bucket's
    end, and p50/p95 latency (created → finished) of the jobs that succeeded in it, per queue.

    Depth is derived from the job table, not sampled: the jobs queued now, minus those created
    after the moment, plus those that left the queue (started, or canceled unstarted) after
    it. A retried job counts as waiting since its first creation."""
    length, bucket = SERIES_WINDOWS[window]
    count = int(length / bucket)
    bucket_s = bucket.total_seconds()
    # Buckets aligned to the clock; the last one is the one in progress.
    aligned = math.floor(now.timestamp() / bucket_s) * bucket_s
    start = datetime.fromtimestamp(aligned - (count - 1) * bucket_s, UTC)
    bucketing = _Bucketing(session.get_bind().dialect.name, start, bucket_s)
    queues = list(QUEUE_NAMES)
    return {
        "window": window,
        "bucket_s": int(bucket_s),
        "start": start.isoformat(),
        "generated_at": now.isoformat(),
        "times": [(start + i * bucket).isoformat() for i in range(count)],
        "throughput_per_min": _outcomes(session, bucketing, count, start),
        "queue_depth": _depths(session, bucketing, count, start, queues),
        "latency_ms": _latencies(session, bucketing, count, start, queues),
        "latency_basis": "created_at → finished_at of succeeded jobs",
    }


class _Bucketing:
    """SQL for a timestamp's bucket index and a job's latency, per dialect (SQLite keeps
    timestamps as text; PostgreSQL as timestamptz)."""

    def __init__(self, dialect: str, start: datetime, bucket_s: float) -> None:
        self.sqlite = dialect == "sqlite"
        self.start = start
        self.bucket_s = bucket_s

    def index(self, column: Any) -> Any:
        if self.sqlite:
            seconds = (func.julianday(column) - func.julianday(_sqlite_text(self.start))) * 86400
            # Rows are at or after the start: truncation is floor.
            return cast(seconds / self.bucket_s, Integer)
        seconds = func.extract("epoch", column - self.start)
        return cast(func.floor(seconds / self.bucket_s), Integer)

    def latency_ms(self) -> Any:
        if self.sqlite:
            return (func.julianday(Job.finished_at) - func.julianday(Job.created_at)) * 86_400_000
        return func.extract("epoch", Job.finished_at - Job.created_at) * 1000

    def latency_bin(self) -> Any:
        latency = self.latency_ms()
        edges = [(latency < edge, i) for i, edge in enumerate(LATENCY_EDGES_MS)]
        return case(*edges, else_=len(LATENCY_EDGES_MS))


def _sqlite_text(moment: datetime) -> str:
    # How SQLAlchemy stores a DateTime on SQLite: naive UTC text.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")


def _outcomes(
    session: Session, bucketing: _Bucketing, count: int, start: datetime
) -> dict[str, list[float]]:
    per_min = 60 / bucketing.bucket_s
    result = {outcome: [0.0] * count for outcome in OUTCOMES}
    index = bucketing.index(Job.finished_at).label("bucket")
    query = (
        select(index, Job.status, Job.error_code, func.count())
        .where(Job.finished_at >= start, Job.status.in_(_FINAL))
        .group_by(index, Job.status, Job.error_code)
    )
    for bucket, status, code, jobs in session.execute(query):
        outcome = "no_subject" if code == "no_subject" else status
        if 0 <= bucket < count and outcome in result:
            result[outcome][bucket] = round(result[outcome][bucket] + jobs * per_min, 3)
    return result


def _depths(
    session: Session, bucketing: _Bucketing, count: int, start: datetime, queues: list[str]
) -> dict[str, list[int]]:
    waiting_now = dict.fromkeys(queues, 0)
    query = select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED.value)
    for queue, jobs in session.execute(query.group_by(Job.queue)):
        waiting_now[queue] = jobs
    # change[q][b]: how the queue grew during bucket b (arrivals − departures).
    change = {queue: [0] * count for queue in waiting_now}
    arrivals = _per_bucket(session, bucketing, Job.created_at, start)
    starts = _per_bucket(session, bucketing, Job.started_at, start)
    dropped = _per_bucket(
        session,
        bucketing,
        Job.finished_at,
        start,
        Job.started_at.is_(None),
        Job.status == JobStatus.CANCELED.value,
    )
    for sign, rows in ((1, arrivals), (-1, starts), (-1, dropped)):
        for (queue, bucket), jobs in rows.items():
            if queue in change and 0 <= bucket < count:
                change[queue][bucket] += sign * jobs
    depths: dict[str, list[int]] = {}
    for queue, growth in change.items():
        level = waiting_now[queue]
        backwards = []
        for bucket in reversed(range(count)):
            backwards.append(max(0, level))
            level -= growth[bucket]
        depths[queue] = backwards[::-1]
    return depths


def _per_bucket(
    session: Session, bucketing: _Bucketing, column: Any, start: datetime, *where: Any
) -> dict[tuple[str, int], int]:
    index = bucketing.index(column).label("bucket")
    query = (
        select(Job.queue, index, func.count())
        .where(column >= start, *where)
        .group_by(Job.queue, index)
    )
    return {(queue, bucket): jobs for queue, bucket, jobs in session.execute(query)}


def _latencies(
    session: Session, bucketing: _Bucketing, count: int, start: datetime, queues: list[str]
) -> dict[str, dict[str, list[float | None]]]:
    histograms: dict[str, list[dict[int, int]]] = {q: [{} for _ in range(count)] for q in queues}
    index = bucketing.index(Job.finished_at).label("bucket")
    latency_bin = bucketing.latency_bin().label("bin")
    query = (
        select(Job.queue, index, latency_bin, func.count())
        .where(Job.finished_at >= start, Job.status == JobStatus.SUCCEEDED.value)
        .group_by(Job.queue, index, latency_bin)
    )
    for queue, bucket, latency, jobs in session.execute(query):
        if 0 <= bucket < count:
            histograms.setdefault(queue, [{} for _ in range(count)])[bucket][latency] = jobs
    return {
        queue: {
            name: [histogram_percentile(h, q) for h in per_bucket]
            for name, q in PERCENTILES.items()
        }
        for queue, per_bucket in histograms.items()
    }


def histogram_percentile(bins: dict[int, int], q: float) -> float | None:
    """The q-th percentile of latencies counted into LATENCY_EDGES_MS bins, interpolated
    geometrically inside its bin (linearly in the first, which starts at 0)."""
    total = sum(bins.values())
    if total == 0:
        return None
    rank = q / 100 * total
    seen = 0
    for index in sorted(bins):
        if seen + bins[index] >= rank:
            if index >= len(LATENCY_EDGES_MS):
                return LATENCY_EDGES_MS[-1]
            share = (rank - seen) / bins[index]
            high = LATENCY_EDGES_MS[index]
            if index == 0:
                return round(high * share, 1)
            low = LATENCY_EDGES_MS[index - 1]
            growth: float = (high / low) ** share  # float ** float is typed Any
            return round(low * growth, 1)
        seen += bins[index]
    return None
