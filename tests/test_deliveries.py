"""Callback delivery: the outbox in the database (SQLite and PostgreSQL), the loop against a
real loopback receiver with the clock driven by the test, and real workers delivering what a
finished job owes, including what a dead worker left undelivered."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from producer import callbacks, jobs, outbox
from producer.db import session_scope
from producer.errors import InvalidRequest, InvalidTransition
from producer.models import Job
from producer.request import JobRequest
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.receiver import CALLBACK_SECRET, Receiver
from tests.support.services import WorkerProcess
from tests.support.session_redis import redis_url_for_tests
from tests.support.transitions import run_to_end
from worker.deliveries import Deliveries

PREFIX = "s3://out/results"
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=outbox.now().tzinfo)


class Clock:
    """The delivery loop's clock, moved by the test instead of waited for."""

    def __init__(self, moment: datetime = T0) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


def _job(url: str, callback_url: str | None) -> str:
    request = JobRequest(input="s3://inputs/photo.jpg", callback_url=callback_url)
    with session_scope(url) as session:
        return jobs.create(session, [request], PREFIX)[0].job.id


def _row(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        return jobs.get(session, job_id)


def _for(settings: Settings, db_url: str, **changes: object) -> Settings:
    return Settings(**{**settings.model_dump(), "database_url": db_url, **changes})


@pytest.fixture
def deliveries(callback_settings: Settings, db_url: str) -> Iterator[Deliveries]:
    loop = Deliveries(_for(callback_settings, db_url), "worker-test", clock=Clock())
    yield loop
    loop.stop(timeout=30)


def _attempts(url: str, job_id: str) -> list[dict[str, object]]:
    return _row(url, job_id).to_record()["callbacks"]


def _wait_attempts(url: str, job_id: str, count: int) -> list[dict[str, object]]:
    poll_until(lambda: len(_attempts(url, job_id)) >= count, timeout=30, what="attempts")
    return _attempts(url, job_id)


# --- the outbox ---------------------------------------------------------------------------


def test_a_job_that_ends_owes_its_callback_and_one_without_a_url_owes_none(
    callback_settings: Settings, receiver: Receiver, db_url: str
) -> None:
    succeeded, failed, canceled, silent = (
        _job(db_url, receiver.url()),
        _job(db_url, receiver.url()),
        _job(db_url, receiver.url()),
        _job(db_url, None),
    )
    assert _row(db_url, succeeded).callback_due_at is None  # queued: nothing owed yet
    run_to_end(db_url, succeeded)
    run_to_end(db_url, failed, error=("invalid_image", "not an image"))
    with session_scope(db_url) as session:
        jobs.cancel(session, canceled)
    run_to_end(db_url, silent)
    for job_id in (succeeded, failed, canceled):
        row = _row(db_url, job_id)
        assert row.callback_due_at is not None and row.callback_tries == 0
        assert row.to_record()["callback_url"] == receiver.url()
    assert _row(db_url, silent).callback_due_at is None


def test_two_senders_never_hold_one_delivery_and_a_dead_senders_claim_runs_out(
    callback_settings: Settings, receiver: Receiver, db_url: str
) -> None:
    job_id = _job(db_url, receiver.url())
    run_to_end(db_url, job_id)
    moment = outbox.now()
    with session_scope(db_url) as session:
        [first] = outbox.claim(session, 10, callback_settings, moment)
    with session_scope(db_url) as session:
        assert outbox.claim(session, 10, callback_settings, moment) == []
    later = moment + timedelta(seconds=outbox.claim_seconds(callback_settings) + 1)
    with session_scope(db_url) as session:
        [second] = outbox.claim(session, 10, callback_settings, later)
    assert second.record["status"] == "succeeded" and "callbacks" not in second.record
    failed = callbacks.Outcome(500, "HTTP 500", 3.0)
    with session_scope(db_url) as session:
        # The stalled first sender's attempt is kept, but the schedule is the second's.
        stale = outbox.record(session, first, failed, callback_settings, worker="a", moment=later)
    with session_scope(db_url) as session:
        fresh = outbox.record(session, second, failed, callback_settings, worker="b", moment=later)
    assert stale is None and fresh is not None and fresh > later
    assert [a["worker"] for a in _attempts(db_url, job_id)] == ["a", "b"]


def test_redeliver_owes_a_finished_jobs_callback_again_and_refuses_the_rest(
    callback_settings: Settings, receiver: Receiver, db_url: str
) -> None:
    job_id, queued, silent = (
        _job(db_url, receiver.url()),
        _job(db_url, receiver.url()),
        _job(db_url, None),
    )
    run_to_end(db_url, job_id)
    run_to_end(db_url, silent)
    with session_scope(db_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(callback_due_at=None))
    with session_scope(db_url) as session:
        outbox.redeliver(session, job_id, T0)
    assert _row(db_url, job_id).callback_due_at is not None
    with session_scope(db_url) as session, pytest.raises(InvalidTransition):
        outbox.redeliver(session, queued, T0)
    with session_scope(db_url) as session, pytest.raises(InvalidRequest):
        outbox.redeliver(session, silent, T0)


def test_the_retry_schedule_doubles_with_jitter_and_covers_more_than_an_hour() -> None:
    settings = Settings()
    delays = [outbox.retry_delay(tries, settings) for tries in range(1, 13)]
    assert delays[-1] is None  # the 12th attempt is the last
    spaced = [d for d in delays if d is not None]
    assert len(spaced) == 11
    nominal = [min(900, 10 * 2**n) for n in range(11)]
    for delay, expected in zip(spaced, nominal, strict=True):
        assert expected * (1 - outbox.JITTER) <= delay <= expected * (1 + outbox.JITTER)
    assert sum(nominal) * (1 - outbox.JITTER) > 3600


# --- the loop against a real receiver -------------------------------------------------------


def test_a_receiver_down_for_over_an_hour_gets_the_delivery_once_it_is_back(
    callback_settings: Settings, receiver: Receiver, db_url: str, deliveries: Deliveries
) -> None:
    """Eleven failures (500, 503, a refused connection's stand-in 502...) on the real schedule,
    the clock stepped to each next attempt, then a 200: delivered on the 12th attempt, every
    attempt recorded, and nothing sent after the success."""
    receiver.answer([500, 503, 502] + [500] * 8)
    job_id = _job(db_url, receiver.url())
    run_to_end(db_url, job_id)
    clock: Clock = deliveries._clock  # type: ignore[assignment]
    clock.moment = outbox.now()
    for attempt in range(1, 13):
        deliveries.run_once()
        attempts = _wait_attempts(db_url, job_id, attempt)
        if attempt < 12:
            clock.moment = datetime.fromisoformat(str(attempts[-1]["next_at"]))
    assert [a["status_code"] for a in attempts] == [500, 503, 502] + [500] * 8 + [200]
    assert attempts[-1]["error"] is None and attempts[-1]["next_at"] is None
    first, last = (datetime.fromisoformat(str(attempts[i]["at"])) for i in (0, -1))
    assert last - first > timedelta(hours=1)
    clock.moment += timedelta(days=1)
    deliveries.run_once()
    deliveries.stop(timeout=30)
    assert len(receiver.received) == 12
    row = _row(db_url, job_id)
    assert row.callback_delivered_at is not None and row.callback_due_at is None
    bodies = {r.body for r in receiver.received}
    assert all(json.loads(body)["id"] == job_id for body in bodies)


def test_the_loop_delivers_as_soon_as_it_is_nudged_and_exactly_once(
    callback_settings: Settings, receiver: Receiver, db_url: str
) -> None:
    loop = Deliveries(_for(callback_settings, db_url, callback_poll_s=60), "worker-test").start()
    try:
        job_id = _job(db_url, receiver.url())
        run_to_end(db_url, job_id)
        loop.nudge()  # what a finished task does; the 60 s poll would be far too late
        [got] = receiver.wait_for(1)
        signature = got.headers["Backdrop-Signature"]
        assert callbacks.verify_signature(CALLBACK_SECRET, signature, got.body)
        assert _wait_attempts(db_url, job_id, 1)[0]["status_code"] == 200
        loop.nudge()
    finally:
        loop.stop(timeout=30)
    assert len(receiver.received) == 1


def test_a_slow_receiver_holds_only_the_sender_threads(
    callback_settings: Settings, receiver: Receiver, db_url: str
) -> None:
    """With the one sender thread stuck on a receiver that does not answer, the loop claims
    nothing more (bounded concurrency) and the jobs' own transitions go on untouched."""
    receiver.release.clear()
    loop = Deliveries(
        _for(callback_settings, db_url, callback_concurrency=1, callback_poll_s=0.1),
        "worker-test",
    ).start()
    try:
        first, second = _job(db_url, receiver.url()), _job(db_url, receiver.url())
        run_to_end(db_url, first)
        receiver.wait_for(1)
        run_to_end(db_url, second)  # a job ends while the sender is stuck
        assert _row(db_url, second).status == "succeeded"
        assert len(receiver.received) == 1
        receiver.release.set()
        receiver.wait_for(2)
    finally:
        loop.stop(timeout=30)


# --- real workers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def worker_env(
    postgres_url: str,
    s3_server: str,
    mobilenet_weights: Path,
    worker_receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    import boto3

    bucket = f"callbacks-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {
        "BACKDROP_DATABASE_URL": postgres_url,
        "BACKDROP_BROKER_URL": redis_url_for_tests(),
        "BACKDROP_S3_ENDPOINT_URL": s3_server,
        "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
        "BACKDROP_INPUT_PREFIX": f"s3://{bucket}/in",
        "BACKDROP_ALLOWED_BUCKETS": bucket,
        "BACKDROP_DATA_DIR": str(tmp_path_factory.mktemp("callbacks-data")),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "2",
        "BACKDROP_CALLBACK_SECRET": CALLBACK_SECRET,
        "BACKDROP_CALLBACK_ALLOWED_HOSTS": worker_receiver.host_port,
        "BACKDROP_CALLBACK_POLL_S": "0.5",
        "OMP_NUM_THREADS": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def worker_settings(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    from producer import settings as settings_module

    settings = Settings(
        **{
            key.removeprefix("BACKDROP_").lower(): value
            for key, value in worker_env.items()
            if key.startswith("BACKDROP_")
        }
    )
    monkeypatch.setattr(settings_module, "_current", settings)
    return settings


def _start_worker(env: dict[str, str], folder: Path) -> WorkerProcess:
    worker = WorkerProcess(env, folder / f"worker-{uuid.uuid4().hex[:6]}.log", concurrency=2)
    return worker.start().wait_ready()


@pytest.mark.integration
def test_a_real_worker_finishes_a_job_and_the_receiver_gets_the_signed_record(
    worker_env: dict[str, str],
    worker_settings: Settings,
    worker_receiver: Receiver,
    photo_bytes: dict[str, bytes],
    tmp_path: Path,
) -> None:
    from producer import broker
    from producer.client import Client
    from producer.storage import Storage
    from tests.support.stack import small_photo

    worker = _start_worker(worker_env, tmp_path)
    try:
        storage = Storage(worker_settings)
        celery = broker.make_celery(worker_settings)
        client = Client(Services(worker_settings, storage=storage, celery=celery))
        bucket = worker_env["BACKDROP_ALLOWED_BUCKETS"]
        photo = f"s3://{bucket}/in/cat.png"
        storage.write(photo, small_photo(photo_bytes["chelsea"]), content_type="image/png")
        before = len(worker_receiver.received)
        record = client.submit({"input": photo, "callback_url": worker_receiver.url("/done")})
        got = worker_receiver.wait_for(before + 1, timeout=120)[before]
    finally:
        worker.stop()
    assert got.path == "/done" and got.headers["Backdrop-Job-Id"] == record["id"]
    assert callbacks.verify_signature(CALLBACK_SECRET, got.headers["Backdrop-Signature"], got.body)
    body = json.loads(got.body)
    assert body["id"] == record["id"] and body["status"] == "succeeded"
    assert body["finished_at"] is not None and body["output"] == record["output"]
    [attempt] = client.get(record["id"])["callbacks"]
    assert attempt["status_code"] == 200 and attempt["worker"] is not None


@pytest.mark.integration
def test_what_a_dead_worker_left_undelivered_is_delivered_by_the_next_worker(
    worker_env: dict[str, str],
    worker_settings: Settings,
    worker_receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The crash points of a worker SIGKILLed after a job's final state was committed:
    before its loop claimed the delivery (owed, due), and while it was sending it (claimed,
    the claim's end passed). A worker started afterwards delivers both, once each."""
    url = worker_settings.database_url
    owed, claimed = _job(url, worker_receiver.url("/owed")), _job(url, worker_receiver.url("/held"))
    run_to_end(url, owed)
    run_to_end(url, claimed, error=("invalid_image", "not an image"))
    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == claimed)
            .values(callback_due_at=outbox.now() - timedelta(seconds=1), callback_tries=3)
        )
    before = len(worker_receiver.received)
    worker = _start_worker(worker_env, tmp_path)
    try:
        got = worker_receiver.wait_for(before + 2, timeout=120)[before:]
        poll_until(
            lambda: all(_row(url, j).callback_delivered_at for j in (owed, claimed)),
            timeout=30,
            what="both deliveries recorded",
        )
    finally:
        worker.stop()
    assert sorted(r.path for r in got) == ["/held", "/owed"]
    assert {json.loads(r.body)["status"] for r in got} == {"succeeded", "failed"}
    assert len(worker_receiver.received) == before + 2


@pytest.mark.integration
def test_a_worker_sigkilled_after_finishing_a_job_still_gets_its_callback_delivered_once(
    worker_env: dict[str, str],
    worker_settings: Settings,
    worker_receiver: Receiver,
    photo_bytes: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """A real crash: the receiver is down (answers 500) while the worker that finished the
    job tries to deliver; that worker is SIGKILLed; once the receiver is back, a second
    worker delivers the signed final record, exactly once. The retry's wait is skipped by
    moving the job's due time in the database, not waited for."""
    from producer.client import Client
    from tests.support.stack import small_photo

    client = Client(Services(worker_settings))
    bucket = worker_env["BACKDROP_ALLOWED_BUCKETS"]
    photo = f"s3://{bucket}/in/crash.png"
    client.storage.write(photo, small_photo(photo_bytes["chelsea"]), content_type="image/png")
    worker_receiver.answer([500] * 100)
    crashed = _start_worker(worker_env, tmp_path)
    try:
        job_id = client.submit({"input": photo, "callback_url": worker_receiver.url("/crash")})[
            "id"
        ]
        first = _wait_attempts(worker_settings.database_url, job_id, 1)[0]
        crashed.kill()
    finally:
        crashed.stop()
    assert first["status_code"] == 500 and first["worker"] == crashed.name
    assert _row(worker_settings.database_url, job_id).callback_delivered_at is None

    worker_receiver.answer([])
    with session_scope(worker_settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(callback_due_at=outbox.now() - timedelta(seconds=1))
        )
    before = len(worker_receiver.received)
    rescuer = _start_worker(worker_env, tmp_path)
    try:
        [got] = worker_receiver.wait_for(before + 1, timeout=120)[before:]
        poll_until(
            lambda: _row(worker_settings.database_url, job_id).callback_delivered_at is not None,
            timeout=30,
            what="the delivery recorded",
        )
    finally:
        rescuer.stop()
    assert len(worker_receiver.received) == before + 1
    assert got.path == "/crash" and got.headers["Backdrop-Job-Id"] == job_id
    assert callbacks.verify_signature(CALLBACK_SECRET, got.headers["Backdrop-Signature"], got.body)
    record = _row(worker_settings.database_url, job_id).to_record()
    final = {key: value for key, value in record.items() if key != "callbacks"}
    assert json.loads(got.body) == final and final["status"] == "succeeded"
    *failed, delivered = record["callbacks"]
    assert {(a["status_code"], a["worker"]) for a in failed} == {(500, crashed.name)}
    assert delivered["status_code"] == 200 and delivered["worker"] == rescuer.name


def test_backdrop_callbacks_redeliver_owes_the_callback_again_and_status_shows_attempts(
    callback_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from producer.db import upgrade

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    job_id, queued = _job(url, receiver.url()), _job(url, receiver.url())
    run_to_end(url, job_id)
    with session_scope(url) as session:
        [held] = outbox.claim(session, 1, callback_settings, outbox.now())
        outbox.record(
            session, held, callbacks.Outcome(200, None, 1.0), callback_settings,
            worker="w", moment=outbox.now(),
        )  # fmt: skip
    backdrop = Path(sys.executable).with_name("backdrop")
    env = {**os.environ, "BACKDROP_DATABASE_URL": url, "BACKDROP_DATA_DIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(backdrop), *args], env=env, capture_output=True, text=True, timeout=120
        )

    shown = run("status", job_id)
    assert shown.returncode == 0 and '"status_code": 200' in shown.stdout
    assert _row(url, job_id).callback_due_at is None
    redelivered = run("callbacks", "redeliver", job_id[:8])
    assert redelivered.returncode == 0, redelivered.stderr
    assert redelivered.stdout.strip() == f"{job_id} callback due now"
    assert _row(url, job_id).callback_due_at is not None
    refused = run("callbacks", "redeliver", queued)
    assert refused.returncode != 0 and refused.stderr.startswith("invalid_transition: ")
