"""How long the dashboard's stats take over a big job table, on PostgreSQL and SQLite.

Fills a scratch database with N jobs (default 500,000) spread evenly over the last D days
(default 3: ~1/3 of them in the 24 h window, ~1/72 in the hour), in the mix a busy store has
(90% succeeded, 6% failed, 2% canceled, 1% queued, 1% running, two queues), then times
`stats.series` for 1h and 24h and `stats.collect` (the /v1/stats answer), each the median
of R runs, first without and then with indexes on finished_at and started_at.

Run: .venv/bin/python bench/stats_series.py [--jobs N] [--days D] [--repeat R] [--sqlite-only]
(PostgreSQL at 127.0.0.1:5432, user postgres, trust; a scratch database is created and dropped.)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from producer.db import session_scope, upgrade
from producer.models import Job
from producer.settings import Settings
from producer.stats import collect, series

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
INDEXES = {
    "ix_jobs_finished_at": "finished_at",
    "ix_jobs_started_at": "started_at",
}
CHUNK = 10_000


def rows(count: int, days: float, now: datetime) -> list[dict]:
    rng = random.Random(7)
    span = days * 86400
    out = []
    for i in range(count):
        created = now - timedelta(seconds=span * (1 - i / count))
        draw = rng.random()
        status = (
            "succeeded" if draw < 0.90 else "failed" if draw < 0.96 else
            "canceled" if draw < 0.98 else "queued" if draw < 0.99 else "running"
        )  # fmt: skip
        started = created + timedelta(seconds=rng.uniform(0.05, 30)) if status != "queued" else None
        finished = None
        if status in ("succeeded", "failed"):
            finished = started + timedelta(seconds=rng.lognormvariate(0, 0.8))
        elif status == "canceled":
            started, finished = None, created + timedelta(seconds=5)
        out.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "status": status,
                "queue": "bulk" if i % 3 else "interactive",
                "input": f"s3://in/{i}.jpg",
                "output": f"s3://out/{i}.png",
                "effect": "remove",
                "params": {},
                "attempts": 1,
                "error_code": "invalid_image" if status == "failed" else None,
                "created_at": created,
                "started_at": started,
                "finished_at": finished,
                "worker": "w1" if started else None,
                "timings_ms": {"segment": 100.0},
            }
        )
    return out


def fill(url: str, data: list[dict]) -> None:
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        for start in range(0, len(data), CHUNK):
            connection.execute(insert(Job), data[start : start + CHUNK])
        if url.startswith("postgresql"):
            connection.execute(text("ANALYZE jobs"))
    engine.dispose()


def median_ms(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(label: str, url: str, now: datetime, repeat: int, data_dir: Path) -> None:
    settings = Settings(database_url=url, data_dir=data_dir)

    def one_series(window: str) -> Callable[[], object]:
        def run() -> object:
            with session_scope(url) as session:
                return series(session, window, now)

        return run

    for indexed in (False, True):
        if indexed:
            engine = create_engine(url)
            with engine.begin() as connection:
                for name, column in INDEXES.items():
                    connection.execute(text(f"CREATE INDEX {name} ON jobs ({column})"))
                if url.startswith("postgresql"):
                    connection.execute(text("ANALYZE jobs"))
            engine.dispose()
        figures = {
            "series 1h": median_ms(one_series("1h"), repeat),
            "series 24h": median_ms(one_series("24h"), repeat),
            "collect": median_ms(lambda: collect(settings, now=now, ping=False), repeat),
        }
        shown = "  ".join(f"{name} {ms:8.1f} ms" for name, ms in figures.items())
        print(f"{label:10} {'with' if indexed else 'without':7} indexes  {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500_000)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    now = datetime.now(UTC)
    data = rows(args.jobs, args.days, now)
    print(f"{args.jobs} jobs over {args.days} days; median of {args.repeat} runs", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        sqlite_url = f"sqlite:///{folder}/jobs.db"
        fill(sqlite_url, data)
        measure("sqlite", sqlite_url, now, args.repeat, Path(folder) / "data")
        if args.sqlite_only:
            return
        name = f"backdrop_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
            fill(url, data)
            measure("postgresql", url, now, args.repeat, Path(folder) / "data")
            from producer.db import get_engine

            get_engine(url).dispose()
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
