"""Statistics over a known set of jobs, on SQLite and PostgreSQL: exact counts, throughput,
percentiles and failures by code; broker probes that degrade instead of raising."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from producer import broker, jobs
from producer import settings as settings_module
from producer.cli import cli
from producer.db import session_scope
from producer.models import Job
from producer.request import JobRequest
from producer.settings import Settings
from producer.stats import collect, histogram_percentile, percentile, series
from tests.support.api import redis_broker_url
from tests.support.transitions import run_to_end

NOW = datetime.now(UTC).replace(microsecond=0)


def embedded(db_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=db_url, data_dir=tmp_path / "data")


def create(url: str, queue: str = "interactive") -> str:
    with session_scope(url) as session:
        (created,) = jobs.create(
            session, [JobRequest(input="s3://inputs/p.jpg", queue=queue)], "s3://out"
        )
        return created.job.id


def finish(
    url: str,
    *,
    worker: str,
    finished_ago: timedelta,
    latency_ms: float,
    timings_ms: dict[str, float] | None = None,
    error_code: str | None = None,
) -> str:
    """A job run to its end by `worker`, then back-dated to known timestamps."""
    job_id = create(url)
    error = (error_code, f"{error_code} for {job_id}") if error_code else None
    run_to_end(url, job_id, worker=worker, error=error, timings_ms=timings_ms)
    finished_at = NOW - finished_ago
    created_at = finished_at - timedelta(milliseconds=latency_ms)
    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(created_at=created_at, started_at=created_at, finished_at=finished_at)
        )
    return job_id


@pytest.fixture
def known_jobs(db_url: str) -> str:
    """18 jobs: 11 succeeded (10 in the last hour), 3 failed, 1 canceled, 2 queued, 1 running."""
    for i in range(1, 11):
        finish(
            db_url,
            worker="worker-a" if i <= 4 else "worker-old",
            finished_ago=timedelta(seconds=10) if i <= 4 else timedelta(minutes=20),
            latency_ms=i * 100,
            timings_ms={"segment": i * 10.0, "upload": 5.0},
        )
    finish(db_url, worker="worker-old", finished_ago=timedelta(hours=2), latency_ms=99_000)
    for code, ago in (("invalid_image", 5), ("invalid_image", 6), ("input_not_found", 3000)):
        finish(
            db_url,
            worker="worker-a" if ago < 60 else "worker-old",
            finished_ago=timedelta(seconds=ago),
            latency_ms=50,
            error_code=code,
        )
    with session_scope(db_url) as session:
        jobs.cancel(session, create(db_url))
    create(db_url)
    create(db_url, queue="bulk")
    running = create(db_url)
    with session_scope(db_url) as session:
        jobs.start(session, running, "worker-b", 60)
    return db_url


def test_counts_by_status_and_queue_are_exact(known_jobs: str, tmp_path: Path) -> None:
    stats = collect(embedded(known_jobs, tmp_path), now=NOW, ping=False)
    assert stats["jobs"]["by_status"] == {
        "queued": 2,
        "running": 1,
        "succeeded": 11,
        "failed": 3,
        "canceled": 1,
    }
    assert stats["jobs"]["total"] == 18
    assert stats["jobs"]["by_queue"]["bulk"] == {
        "queued": 1,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }
    assert stats["jobs"]["by_queue"]["interactive"]["succeeded"] == 11


def test_throughput_counts_finished_work_in_the_last_minute_and_hour(
    known_jobs: str, tmp_path: Path
) -> None:
    stats = collect(embedded(known_jobs, tmp_path), now=NOW, ping=False)
    # 4 succeeded + 2 failed in the last minute; + 6 succeeded + 1 failed within the hour.
    # The canceled job finished too, but it was never work done.
    assert stats["throughput"] == {"last_minute": 6, "last_hour": 13}


def test_latency_percentiles_cover_the_succeeded_jobs_of_the_last_hour(
    known_jobs: str, tmp_path: Path
) -> None:
    latency = collect(embedded(known_jobs, tmp_path), now=NOW, ping=False)["latency_ms"]
    assert latency["sample_size"] == 10  # the two-hour-old 99 s job is outside the window
    assert latency["end_to_end"] == {"p50": 550.0, "p95": 955.0}
    assert latency["stages"] == {
        "segment": {"p50": 55.0, "p95": 95.5},
        "upload": {"p50": 5.0, "p95": 5.0},
    }


def test_failures_are_counted_by_error_code(known_jobs: str, tmp_path: Path) -> None:
    stats = collect(embedded(known_jobs, tmp_path), now=NOW, ping=False)
    assert stats["failures_by_code"] == {"invalid_image": 2, "input_not_found": 1}


def test_live_workers_are_those_seen_in_the_last_minutes_or_running_a_job(
    known_jobs: str, tmp_path: Path
) -> None:
    workers = collect(embedded(known_jobs, tmp_path), now=NOW, ping=False)["workers"]
    assert [w["name"] for w in workers["seen"]] == ["worker-a", "worker-b"]
    assert workers["pinged"] is None


def test_an_empty_store_has_zero_counts_and_no_percentiles(db_url: str, tmp_path: Path) -> None:
    stats = collect(embedded(db_url, tmp_path), now=NOW)
    assert stats["jobs"]["total"] == 0
    assert stats["latency_ms"]["end_to_end"] == {"p50": None, "p95": None}
    assert stats["queue_depth"] == {"interactive": 0, "bulk": 0}
    assert stats["notes"] == []


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == 3.85


def test_queue_depth_counts_embedded_broker_files_per_queue(db_url: str, tmp_path: Path) -> None:
    settings = embedded(db_url, tmp_path)
    broker.enqueue(
        broker.make_celery(settings), [("a", "interactive"), ("b", "bulk"), ("c", "bulk")]
    )
    assert collect(settings, ping=False)["queue_depth"] == {"interactive": 1, "bulk": 2}


@pytest.mark.integration
def test_queue_depth_reads_redis_list_lengths(db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=db_url, broker_url=redis_broker_url(), data_dir=tmp_path / "data"
    )
    broker.enqueue(
        broker.make_celery(settings), [("a", "interactive"), ("b", "interactive"), ("c", "bulk")]
    )
    stats = collect(settings, ping=True)
    assert stats["queue_depth"] == {"interactive": 2, "bulk": 1}
    # A worker of another test may share this Redis; what matters is that the ping answered.
    assert isinstance(stats["workers"]["pinged"], list) and stats["notes"] == []


def test_an_unreachable_broker_is_reported_not_raised(db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=db_url, broker_url="redis://127.0.0.1:1/0", data_dir=tmp_path / "data"
    )
    stats = collect(settings, ping=False)
    assert stats["queue_depth"] is None
    assert any("queue depth unavailable" in note for note in stats["notes"])


def test_the_cli_prints_a_table_or_json(
    known_jobs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "_current", embedded(known_jobs, tmp_path))
    as_json = CliRunner().invoke(cli, ["stats", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["failures_by_code"]["invalid_image"] == 2
    table = CliRunner().invoke(cli, ["stats"])
    assert table.exit_code == 0, table.output
    assert "invalid_image 2, input_not_found 1" in table.output
    assert "queue depth  interactive 0, bulk 0" in table.output


# --- the dashboard's time series ----------------------------------------------------------

# Half a minute into a minute: the current one-minute bucket is index 59 of the hour.
MOMENT = NOW.replace(second=30)
HOUR_START = MOMENT.replace(second=0) - timedelta(minutes=59)


def at_minute(index: int, second: float = 10) -> datetime:
    """A moment inside the hour window's bucket `index` (0 is the oldest, 59 the current)."""
    return HOUR_START + timedelta(minutes=index, seconds=second)


def dated(
    url: str,
    *,
    created: datetime,
    started: datetime | None = None,
    finished: datetime | None = None,
    queue: str = "interactive",
    error_code: str | None = None,
    cancel: bool = False,
) -> str:
    """A job in the state its timestamps say, back-dated to them."""
    job_id = create(url, queue)
    if cancel:
        with session_scope(url) as session:
            jobs.cancel(session, job_id)
    elif finished is not None:
        error = (error_code, f"{error_code} for {job_id}") if error_code else None
        run_to_end(url, job_id, error=error)
    elif started is not None:
        with session_scope(url) as session:
            jobs.start(session, job_id, "worker-a", 60)
    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(created_at=created, started_at=started, finished_at=finished)
        )
    return job_id


def hour_series(url: str) -> dict:
    with session_scope(url) as session:
        return series(session, "1h", MOMENT)


def test_the_series_has_one_point_per_minute_over_the_hour(db_url: str) -> None:
    result = hour_series(db_url)
    assert result["bucket_s"] == 60 and len(result["times"]) == 60
    assert result["times"][0] == HOUR_START.isoformat()
    assert all(len(values) == 60 for values in result["throughput_per_min"].values())
    assert result["queue_depth"] == {"interactive": [0] * 60, "bulk": [0] * 60}
    assert result["latency_ms"]["interactive"]["p95"] == [None] * 60


def test_throughput_is_counted_per_minute_by_outcome(db_url: str) -> None:
    for _ in range(3):
        dated(db_url, created=at_minute(59, 1), started=at_minute(59, 2), finished=at_minute(59))
    for code in ("invalid_image", "input_not_found", "no_subject"):
        dated(db_url, created=at_minute(49), started=at_minute(50, 1), finished=at_minute(50),
              error_code=code)  # fmt: skip
    dated(db_url, created=at_minute(39), finished=at_minute(40), cancel=True)
    dated(
        db_url,
        created=at_minute(0) - timedelta(hours=2),
        finished=at_minute(0) - timedelta(hours=1),
    )
    flow = hour_series(db_url)["throughput_per_min"]
    assert {outcome: sum(per_minute) for outcome, per_minute in flow.items()} == {
        "succeeded": 3, "failed": 2, "no_subject": 1, "canceled": 1,
    }  # fmt: skip
    assert (flow["succeeded"][59], flow["failed"][50], flow["no_subject"][50]) == (3, 2, 1)
    assert flow["canceled"][40] == 1


def test_a_quarter_hour_bucket_reports_jobs_per_minute(db_url: str) -> None:
    for _ in range(3):
        dated(db_url, created=at_minute(58), started=at_minute(58), finished=at_minute(59))
    with session_scope(db_url) as session:
        day = series(session, "24h", MOMENT)
    assert day["bucket_s"] == 900 and len(day["times"]) == 96
    assert sum(day["throughput_per_min"]["succeeded"]) == pytest.approx(3 / 15, abs=1e-3)


def test_queue_depth_follows_jobs_in_and_out_of_each_queue(db_url: str) -> None:
    dated(db_url, created=at_minute(10), started=at_minute(30), finished=at_minute(31))
    dated(db_url, created=at_minute(20))  # still waiting
    dated(db_url, created=at_minute(25), started=at_minute(26))  # running
    dated(db_url, created=at_minute(5), finished=at_minute(15), queue="bulk", cancel=True)
    depth = hour_series(db_url)["queue_depth"]
    expected = [0] * 10 + [1] * 10 + [2] * 5 + [3] + [2] * 4 + [1] * 30
    assert depth["interactive"] == expected
    assert depth["bulk"] == [0] * 5 + [1] * 10 + [0] * 45


def test_latency_percentiles_are_per_minute_and_per_queue(db_url: str) -> None:
    for i in range(1, 11):
        finished = at_minute(45)
        dated(db_url, created=finished - timedelta(milliseconds=i * 100), started=finished,
              finished=finished)  # fmt: skip
    finished = at_minute(46)
    dated(db_url, created=finished - timedelta(seconds=90), started=finished, finished=finished,
          queue="bulk")  # fmt: skip
    latency = hour_series(db_url)["latency_ms"]
    p50, p95 = latency["interactive"]["p50"][45], latency["interactive"]["p95"][45]
    # Exact: 550 and 955 ms; the histogram is exact to its 25%-wide bin.
    assert 550 / 1.25 <= p50 <= 550 * 1.25 and 955 / 1.25 <= p95 <= 955 * 1.25
    assert latency["interactive"]["p50"][46] is None
    assert 90_000 / 1.25 <= latency["bulk"]["p50"][46] <= 90_000 * 1.25


def test_histogram_percentiles_interpolate_inside_a_bin() -> None:
    assert histogram_percentile({}, 50) is None
    assert histogram_percentile({0: 2}, 50) == 2.5  # half of the first bin, 0 to 5 ms
    assert histogram_percentile({1: 1}, 100) == 6.2  # the top of the bin 5 to 6.25 ms
