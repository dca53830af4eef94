"""Backfills against real services: PostgreSQL, Redis and an HTTP S3 endpoint holding a few
hundred photos. Most tests complete jobs with a fake worker thread that drives the jobs
through `producer.jobs`' transitions (the engine is under test, not the imaging); one test
runs a real `backdrop worker` over a small prefix end to end."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select, text, update

from producer import jobs
from producer.api import create_app
from producer.backfill import BackfillRunner
from producer.backfill.source import Chunk, read_ahead
from producer.db import get_engine, session_scope
from producer.errors import BackfillUnreachable, InputNotFound
from producer.models import Backfill, Job
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.services import S3_TEST_CREDENTIALS, WorkerProcess
from tests.support.session_redis import redis_url_for_tests

pytestmark = pytest.mark.integration

PHOTOS = 300
TOKEN = "backfill-token-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def tiny_png(shade: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade % 256, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_many(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()
            )
        )


@pytest.fixture(scope="module")
def photo_bucket(s3_server: str) -> str:
    """One bucket with PHOTOS small PNGs under photos/, shared by the module's tests (each
    test writes under its own output prefix, which keeps their fingerprints apart)."""
    bucket = f"backfill-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    upload_many(s3_server, bucket, {f"photos/{i:04d}.png": tiny_png(i) for i in range(PHOTOS)})
    return bucket


@pytest.fixture(scope="module")
def broker_url() -> str:
    return redis_url_for_tests()


@pytest.fixture
def env(postgres_url: str, s3_server: str, photo_bucket: str, broker_url: str, tmp_path: Path):
    """BACKDROP_* for this test, shared by in-process settings and CLI subprocesses."""
    return {
        "BACKDROP_DATABASE_URL": postgres_url,
        "BACKDROP_BROKER_URL": broker_url,
        "BACKDROP_S3_ENDPOINT_URL": s3_server,
        "BACKDROP_ALLOWED_BUCKETS": photo_bucket,
        "BACKDROP_OUTPUT_PREFIX": f"s3://{photo_bucket}/adhoc",
        "BACKDROP_DATA_DIR": str(tmp_path / "data"),
        "BACKDROP_BACKFILL_CHUNK": "50",
        **S3_TEST_CREDENTIALS,
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Iterator[Settings]:
    """Empties the shared PostgreSQL database's jobs and backfills afterwards, as `db_url`
    does: later modules count jobs."""
    yield Settings(
        **{k.removeprefix("BACKDROP_").lower(): v for k, v in env.items() if "BACKDROP_" in k}
    )
    with get_engine(env["BACKDROP_DATABASE_URL"]).begin() as connection:
        connection.execute(text("TRUNCATE jobs, backfills"))


@pytest.fixture
def engine(settings: Settings) -> BackfillRunner:
    return BackfillRunner(Services(settings))


@pytest.fixture
def out(photo_bucket: str) -> str:
    return f"s3://{photo_bucket}/out-{uuid.uuid4().hex[:8]}"


class FakeWorker:
    """Takes queued jobs writing under `prefix` through start → succeed (or fail, when
    `failure` names a code for the job), and notes the most jobs of a backfill ever in flight."""

    def __init__(
        self,
        settings: Settings,
        prefix: str,
        failure: Callable[[Job], str | None] = lambda _job: None,
    ) -> None:
        self._url = settings.database_url
        self._prefix = prefix
        self._failure = failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.max_in_flight = 0

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            with session_scope(self._url) as session:
                self._note_in_flight(session)
                ids = session.scalars(
                    select(Job.id)
                    .where(Job.status == "queued", Job.output.startswith(self._prefix + "/"))
                    .limit(15)
                ).all()
                for job_id in ids:
                    self._finish(session, job_id)

    def _note_in_flight(self, session: Any) -> None:
        counts = session.scalars(
            select(func.count())
            .where(Job.status.in_(["queued", "running"]), Job.output.startswith(self._prefix))
            .group_by(Job.backfill_id)
        ).all()
        self.max_in_flight = max([self.max_in_flight, *counts])

    def _finish(self, session: Any, job_id: str) -> None:
        job = jobs.start(session, job_id, "fake-worker", 60)
        if job is None:
            return
        code = self._failure(job)
        if code:
            jobs.fail(session, job_id, job.attempts, code, f"fake {code} for {job.input}")
            return
        jobs.own_outputs(session, job_id, job.attempts)  # as a worker does before writing
        jobs.succeed(
            session,
            job_id,
            job.attempts,
            model_name="fake",
            model_weights=None,
            timings_ms={},
            input_size=(8, 8),
            foreground_fraction=0.5,
        )


def jobs_of(settings: Settings, backfill_id: str) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job).where(Job.backfill_id == backfill_id)))


def backfill_row(settings: Settings, backfill_id: str) -> Backfill:
    with session_scope(settings.database_url) as session:
        backfill = session.get(Backfill, backfill_id)
        assert backfill is not None
        return backfill


def published_ids(broker_url: str) -> set[str]:
    messages = redis.Redis.from_url(broker_url).lrange("bulk", 0, -1)
    return {json.loads(message)["headers"]["id"] for message in messages}


def run_backfill(engine: BackfillRunner, source: str, out: str, **options: Any) -> dict[str, Any]:
    max_in_flight = options.pop("max_in_flight", None)
    created = engine.create(source, out, options, max_in_flight)
    return engine.run(created["id"])


# --- tests --------------------------------------------------------------------------------


def test_a_dry_run_counts_every_photo_and_writes_nothing(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    counts = engine.dry_run(f"s3://{photo_bucket}/photos/", out, {"effect": "blur"})
    assert counts == {"listed": PHOTOS, "would_skip": 0, "would_submit": PHOTOS}
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).where(Job.output.startswith(out))) == 0


def test_a_backfill_submits_every_photo_once_into_bulk_within_max_in_flight(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str, broker_url: str
) -> None:
    with FakeWorker(settings, out) as worker:
        record = run_backfill(engine, f"s3://{photo_bucket}/photos/", out, max_in_flight=40)

    assert record["status"] == "completed"
    assert record["counts"] | {"in_flight": 0} == {
        "listed": PHOTOS,
        "skipped": 0,
        "submitted": PHOTOS,
        "succeeded": PHOTOS,
        "failed": 0,
        "in_flight": 0,
    }
    created = jobs_of(settings, record["id"])
    assert sorted(job.input for job in created) == [
        f"s3://{photo_bucket}/photos/{i:04d}.png" for i in range(PHOTOS)
    ]
    assert {job.queue for job in created} == {"bulk"}
    assert {job.output for job in created} == {f"{out}/{i:04d}.png" for i in range(PHOTOS)}
    assert all(job.input_etag and job.fingerprint for job in created)
    assert 0 < worker.max_in_flight <= 40
    assert {job.id for job in created} <= published_ids(broker_url)


def test_re_running_a_finished_backfill_does_nothing_and_a_changed_parameter_reprocesses(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/"
    with FakeWorker(settings, out):
        first = run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
        again = run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
        counted = engine.dry_run(source, out, {"effect": "blur", "blur_strength": 0.3})
        changed = run_backfill(engine, source, out, effect="blur", blur_strength=0.6)

    assert first["counts"]["submitted"] == PHOTOS
    assert again["status"] == "completed"
    assert again["counts"]["skipped"] == PHOTOS and again["counts"]["submitted"] == 0
    assert jobs_of(settings, again["id"]) == []
    assert counted == {"listed": PHOTOS, "would_skip": PHOTOS, "would_submit": 0}
    assert changed["counts"]["submitted"] == PHOTOS and changed["counts"]["skipped"] == 0


def test_a_changed_parameter_adds_a_job_per_photo_and_keeps_the_first_ones_records(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/000"  # 0000 … 0009
    with FakeWorker(settings, out):
        first = run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
        before = {job.id: job.to_record() for job in jobs_of(settings, first["id"])}
        changed = run_backfill(engine, source, out, effect="blur", blur_strength=0.6)

    assert {job.id: job.to_record() for job in jobs_of(settings, first["id"])} == before
    second = jobs_of(settings, changed["id"])
    assert len(second) == 10 and not {job.id for job in second} & before.keys()
    assert {job.params["blur_strength"] for job in second} == {0.6}
    # Each photo's new job owns the output the first one wrote, so it could replace it.
    assert all(job.owns_output and job.status == "succeeded" for job in second)
    api = Services(settings.model_copy(update={"api_tokens": [TOKEN]}))
    with TestClient(create_app(api)) as http:
        listed = http.get("/v1/jobs", params={"output": second[0].output}, headers=AUTH)
    runs = listed.json()["jobs"]
    assert [run["backfill_id"] for run in runs] == [changed["id"], first["id"]]
    assert [run["params"]["blur_strength"] for run in runs] == [0.6, 0.3]


def test_going_back_to_earlier_parameters_reprocesses_since_the_output_holds_later_ones(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/001"  # 0010 … 0019, written as 0.png … 9.png
    with FakeWorker(settings, out):
        run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
        run_backfill(engine, source, out, effect="blur", blur_strength=0.6)
        back = run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
        again = run_backfill(engine, source, out, effect="blur", blur_strength=0.3)

    assert back["counts"]["submitted"] == 10 and back["counts"]["succeeded"] == 10
    assert again["counts"]["skipped"] == 10 and again["counts"]["submitted"] == 0
    with session_scope(settings.database_url) as session:
        runs = jobs.listing(session, output=f"{out}/2.png")
    assert [job.params["blur_strength"] for job in runs] == [0.3, 0.6, 0.3]


def test_a_backfill_never_re_runs_a_photo_whose_output_is_still_being_written(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/002"  # 0020 … 0029, written as 0.png … 9.png
    with FakeWorker(settings, out):
        run_backfill(engine, source, out, effect="blur", blur_strength=0.3)
    with session_scope(settings.database_url) as session:
        (held,) = jobs.listing(session, output=f"{out}/5.png")
        # As if a worker were still on it (the fake worker only takes queued jobs).
        session.execute(
            update(Job).where(Job.id == held.id).values(status="running", finished_at=None)
        )

    with FakeWorker(settings, out):
        record = run_backfill(engine, source, out, effect="blur", blur_strength=0.6)

    assert record["counts"]["submitted"] == 9 and record["counts"]["skipped"] == 1
    with session_scope(settings.database_url) as session:
        assert [job.id for job in jobs.listing(session, output=f"{out}/5.png")] == [held.id]


def test_a_backfill_killed_mid_way_resumes_without_skipping_or_doubling_a_photo(
    engine: BackfillRunner, settings: Settings, env: dict[str, str], photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/"
    command = [sys.executable, "-m", "producer.cli", "backfill", source, "--output-prefix", out]
    process = subprocess.Popen(
        [*command, "--max-in-flight", "60"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with FakeWorker(settings, out):
            poll_until(
                lambda: _submitted(settings, source, out) >= 120 or process.poll() is not None,
                timeout=60,
                what="the backfill to pass 120 photos",
            )
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    (backfill_id,) = _backfill_ids(settings, source, out)
    killed = backfill_row(settings, backfill_id)
    assert killed.status == "running" and 120 <= killed.submitted < PHOTOS

    with FakeWorker(settings, out):
        record = engine.run(backfill_id)

    assert record["status"] == "completed"
    inputs = [job.input for job in jobs_of(settings, backfill_id)]
    assert sorted(inputs) == [f"{source}{i:04d}.png" for i in range(PHOTOS)]
    assert record["counts"]["submitted"] == record["counts"]["succeeded"] == PHOTOS


def _backfill_ids(settings: Settings, source: str, out: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        query = select(Backfill.id).where(Backfill.source == source, Backfill.output_prefix == out)
        return list(session.scalars(query))


def _submitted(settings: Settings, source: str, out: str) -> int:
    with session_scope(settings.database_url) as session:
        query = select(Backfill.submitted).where(
            Backfill.source == source, Backfill.output_prefix == out
        )
        return session.scalar(query) or 0


def test_a_paused_backfill_stops_submitting_and_a_canceled_one_cancels_its_queued_jobs(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    created = engine.create(f"s3://{photo_bucket}/photos/", out, {}, 20)
    runner = engine.start_in_thread(created["id"])
    poll_until(
        lambda: backfill_row(settings, created["id"]).submitted >= 20,
        timeout=30,
        what="the first chunk",
    )
    assert engine.pause(created["id"])["status"] == "paused"
    runner.join(timeout=30)
    assert not runner.is_alive()
    assert backfill_row(settings, created["id"]).submitted == 20

    runner = engine.start_in_thread(created["id"])
    poll_until(
        lambda: backfill_row(settings, created["id"]).status == "running",
        timeout=30,
        what="the resume",
    )
    canceled = engine.cancel(created["id"])
    runner.join(timeout=30)

    assert canceled["status"] == "canceled" and not runner.is_alive()
    statuses = {job.status for job in jobs_of(settings, created["id"])}
    assert statuses == {"canceled"}
    assert engine.get(created["id"])["status"] == "canceled"


def test_a_manifest_backfill_reports_its_failures_with_codes_as_csv_in_storage(
    engine: BackfillRunner, settings: Settings, s3_server: str, photo_bucket: str, out: str
) -> None:
    upload_many(s3_server, photo_bucket, {"odd/with space.png": tiny_png(7)})
    lines = [f"{photo_bucket},photos/{i:04d}.png" for i in range(20)]
    lines += [f"{photo_bucket},odd/with%20space.png", f"{photo_bucket},photos/missing.png"]
    lines += [f"{photo_bucket},photos/0003.png"]  # listed twice: processed once
    manifest = f"s3://{photo_bucket}/manifests/{uuid.uuid4().hex}.csv"
    engine.storage.write(manifest, "\n".join(lines).encode(), content_type="text/csv")

    def failure(job: Job) -> str | None:
        if not job.input_etag:
            return "input_not_found"
        return "invalid_image" if job.input.endswith("0005.png") else None

    with FakeWorker(settings, out, failure):
        record = run_backfill(engine, manifest, out)

    assert record["status"] == "completed"
    assert record["counts"]["listed"] == 23 and record["counts"]["skipped"] == 1
    assert record["counts"]["succeeded"] == 20 and record["counts"]["failed"] == 2
    assert record["report"] == f"{out}/_backfills/{record['id']}/failures.csv"
    report = list(csv.DictReader(io.StringIO(engine.storage.read(record["report"]).decode())))
    assert [(row["input"], row["error_code"]) for row in report] == [
        (f"s3://{photo_bucket}/photos/0005.png", "invalid_image"),
        (f"s3://{photo_bucket}/photos/missing.png", "input_not_found"),
    ]
    assert all(row["job_id"] and row["status"] == "failed" for row in report)
    assert f"{out}/odd/with space.png" in {job.output for job in jobs_of(settings, record["id"])}


def test_the_api_starts_a_backfill_shows_its_counters_and_refuses_bad_requests(
    settings: Settings, photo_bucket: str, out: str
) -> None:
    settings = settings.model_copy(update={"api_tokens": [TOKEN]})
    source = f"s3://{photo_bucket}/photos/00"  # 0000 … 0099
    body = {"source": source, "output_prefix": out, "effect": "desaturate"}
    with TestClient(create_app(Services(settings))) as http, FakeWorker(settings, out):
        assert http.post("/v1/backfills", json=body).status_code == 401
        dry = http.post("/v1/backfills", json=body | {"dry_run": True}, headers=AUTH)
        assert dry.status_code == 200 and dry.json()["counts"]["would_submit"] == 100
        started = http.post("/v1/backfills", json=body, headers=AUTH)
        assert started.status_code == 202, started.text
        url = f"/v1/backfills/{started.json()['id']}"
        poll_until(
            lambda: http.get(url, headers=AUTH).json()["status"] == "completed",
            timeout=60,
            what="the API's backfill to complete",
        )
        record = http.get(url, headers=AUTH).json()
        listed = http.get("/v1/backfills", headers=AUTH).json()["backfills"]
        refused = [
            http.post("/v1/backfills", json=bad, headers=AUTH)
            for bad in (
                {"output_prefix": out},
                body | {"source": "/etc/passwd.csv"},
                body | {"output": f"{out}/x.png"},
                body | {"effect": "sparkle"},
                body | {"max_in_flight": 0},
                body | {"source": "s3://not-allowed/photos/"},
                [body],
            )
        ]
        missing = http.get("/v1/backfills/no-such-id", headers=AUTH)
        cancel_done = http.post(f"{url}/cancel", headers=AUTH)

    assert record["counts"]["submitted"] == record["counts"]["succeeded"] == 100
    assert record["id"] in {b["id"] for b in listed}
    assert [r.status_code for r in refused] == [422, 422, 422, 422, 422, 403, 422]
    assert all("code" in r.json()["error"] for r in refused)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "backfill_not_found"
    assert cancel_done.status_code == 409


def test_a_real_worker_processes_a_small_backfill_end_to_end(
    engine: BackfillRunner,
    settings: Settings,
    env: dict[str, str],
    s3_server: str,
    photo_bucket: str,
    mobilenet_weights: Path,
    tmp_path: Path,
    out: str,
) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:6]}/"
    upload_many(
        s3_server, photo_bucket, {f"{prefix}{i:02d}.png": tiny_png(i, 48) for i in range(20)}
    )
    worker_env = {
        **env,
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "256",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "4",
    }
    log_path = tmp_path / "worker.log"
    with WorkerProcess(worker_env, log_path, concurrency=None, queues=["bulk"]):
        engine = BackfillRunner(
            Services(settings.model_copy(update={"model": "deeplabv3_mobilenet_v3_large"}))
        )
        record = run_backfill(engine, f"s3://{photo_bucket}/{prefix}", out, effect="desaturate")

    assert record["status"] == "completed", log_path.read_text()[-3000:]
    assert record["counts"]["succeeded"] == 20 and record["counts"]["failed"] == 0
    for job in jobs_of(settings, record["id"]):
        assert job.model_name == "deeplabv3_mobilenet_v3_large"
        assert Image.open(io.BytesIO(engine.storage.read(job.output))).size == (48, 48)


def test_photos_whose_names_differ_only_in_extension_get_distinct_outputs(
    engine: BackfillRunner, settings: Settings, s3_server: str, photo_bucket: str, out: str
) -> None:
    prefix = f"same-stem-{uuid.uuid4().hex[:6]}/"
    names = ["cat.jpg", "cat.png", "dog.PNG"]
    upload_many(
        s3_server, photo_bucket, {prefix + name: tiny_png(i) for i, name in enumerate(names)}
    )
    source = f"s3://{photo_bucket}/{prefix}"

    counted = engine.dry_run(source, out, {})
    with FakeWorker(settings, out):
        record = run_backfill(engine, source, out)

    assert counted == {"listed": 3, "would_skip": 0, "would_submit": 3}
    assert record["status"] == "completed" and record["counts"]["succeeded"] == 3
    assert {
        job.input.rsplit("/", 1)[-1]: job.output for job in jobs_of(settings, record["id"])
    } == {
        "cat.jpg": f"{out}/cat.jpg.png",
        "cat.png": f"{out}/cat.png",
        "dog.PNG": f"{out}/dog.PNG.png",
    }


def test_a_later_photo_never_takes_over_the_output_of_another_photo(
    engine: BackfillRunner, settings: Settings, s3_server: str, photo_bucket: str, out: str
) -> None:
    # `cat` (no extension) and `cat.png` both map to cat.png: in one listing they meet in one
    # chunk; here they come from two runs (as from two chunks), the first already final.
    first, second = (f"stem-{uuid.uuid4().hex[:6]}/" for _ in range(2))
    upload_many(
        s3_server, photo_bucket, {first + "cat": tiny_png(1), second + "cat.png": tiny_png(2)}
    )
    with FakeWorker(settings, out):
        earlier = run_backfill(engine, f"s3://{photo_bucket}/{first}", out)
        later = run_backfill(engine, f"s3://{photo_bucket}/{second}", out)

    (job,) = jobs_of(settings, earlier["id"])
    assert job.output == f"{out}/cat.png" and job.input.endswith(f"/{first}cat")
    assert job.status == "succeeded" and job.attempts == 1
    assert later["counts"]["submitted"] == 0 and jobs_of(settings, later["id"]) == []


def test_a_backfill_whose_first_jobs_all_fail_access_denied_stops_and_cancels_the_rest(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    created = engine.create(f"s3://{photo_bucket}/photos/", out, {}, 40)

    refusing = FakeWorker(settings, out, failure=lambda _job: "access_denied")
    expected = pytest.raises(BackfillUnreachable, match=r"first \d+ jobs all failed access_denied")
    with refusing, expected:
        engine.run(created["id"])

    record = engine.get(created["id"])
    assert record["status"] == "failed" and "--resume" in record["error"]
    assert record["counts"]["submitted"] < PHOTOS
    statuses = {job.status for job in jobs_of(settings, created["id"])}
    assert statuses <= {"failed", "canceled"}


def test_a_re_run_skips_photos_that_failed_for_their_own_sake_and_retries_the_rest(
    engine: BackfillRunner, settings: Settings, photo_bucket: str, out: str
) -> None:
    source = f"s3://{photo_bucket}/photos/000"  # 0000 … 0009
    codes = {"0005.png": "invalid_image", "0006.png": "storage_unavailable"}

    def failure(job: Job) -> str | None:
        return codes.get(job.input.rsplit("/", 1)[-1])

    with FakeWorker(settings, out, failure):
        first = run_backfill(engine, source, out)
        again = run_backfill(engine, source, out)

    assert (first["counts"]["succeeded"], first["counts"]["failed"]) == (8, 2)
    assert (again["counts"]["skipped"], again["counts"]["submitted"]) == (9, 1)
    (retried,) = jobs_of(settings, again["id"])
    assert retried.input.endswith("0006.png")


# --- reading the listing ahead ---------------------------------------------------------------


def _chunks(count: int, read: list[int], fail_at: int | None = None) -> Iterator[Chunk]:
    for number in range(count):
        if number == fail_at:
            raise InputNotFound("the listing broke off")
        read.append(number)
        yield Chunk([], str(number))


def test_the_listing_read_ahead_yields_every_chunk_in_order() -> None:
    read: list[int] = []
    assert [chunk.position for chunk in read_ahead(_chunks(7, read))] == [str(n) for n in range(7)]


def test_a_listing_error_reaches_the_backfill_after_the_chunks_before_it() -> None:
    seen = []
    with pytest.raises(InputNotFound, match="broke off"):
        for chunk in read_ahead(_chunks(7, [], fail_at=3)):
            seen.append(chunk.position)
    assert seen == ["0", "1", "2"]


def test_a_backfill_that_stops_early_stops_the_listing_within_two_chunks() -> None:
    read: list[int] = []
    finished = threading.Event()

    def chunks() -> Iterator[Chunk]:
        try:
            yield from _chunks(1000, read)
        finally:
            finished.set()

    with contextlib.closing(read_ahead(chunks())) as ahead:
        assert next(ahead).position == "0"
    assert finished.wait(timeout=10)
    assert len(read) <= 3
