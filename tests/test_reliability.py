"""Failure taxonomy, crash recovery and outages, against real servers and real workers.

PostgreSQL and Redis are dedicated servers of this module (own ports and data folders, Redis
with its append-only file), restarted by their process ids; S3 errors are real 503s over HTTP
from the fault-injecting proxy; workers are `backdrop worker` processes killed with SIGKILL.
Every promise is checked from the database (job records) and storage (what was written).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import poll_until
from tests.stack import LEASE_S, MAX_ATTEMPTS, VISIBILITY_TIMEOUT_S, Stack, build_stack, small_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 2
# A killed worker's jobs: its lease runs out, the next beat (every lease/3) of a live worker
# requeues them, and they run again. Generous slack for a loaded two-core CI machine.
RECOVERY_BOUND_S = LEASE_S + LEASE_S / 3 + VISIBILITY_TIMEOUT_S + 45
FINISH_S = 120


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(tmp_path_factory.mktemp("reliability"), s3_server, mobilenet_weights)
    try:
        stack.start_workers(WORKERS)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def live(stack: Stack) -> Iterator[Stack]:
    """The stack with its workers alive and no fault injected, before and after each test."""
    stack.proxy.heal()
    stack.proxy.release()
    stack.ensure_workers(WORKERS)
    yield stack
    stack.proxy.heal()
    stack.proxy.release()


@pytest.fixture(scope="module")
def photo(photo_bytes: dict[str, bytes]) -> bytes:
    return small_photo(photo_bytes["astronaut"])


def _inputs(stack: Stack, photo: bytes, prefix: str, count: int) -> list[str]:
    return [stack.upload(f"{prefix}/{i}.png", photo) for i in range(count)]


def _assert_each_succeeded_once(stack: Stack, records: dict[str, dict]) -> None:
    for record in records.values():
        assert record["status"] == "succeeded", record
        assert stack.storage.exists(record["output"]), record
        assert stack.writes_of(record["output"]) == 1, record["output"]


# --- 1. failure taxonomy ----------------------------------------------------------------


def test_a_few_503s_from_s3_are_retried_and_the_job_succeeds_on_its_second_attempt(
    live: Stack, photo: bytes
) -> None:
    (location,) = _inputs(live, photo, f"flaky-{uuid.uuid4().hex[:6]}", 1)
    # Two 503s use up the first attempt's two botocore tries: a transient failure.
    live.proxy.fail(count=2, match=live.key_of(location))
    (job_id,) = live.submit([{"input": location}])
    record = live.wait_final([job_id], timeout=FINISH_S)[job_id]
    assert record["status"] == "succeeded" and record["error"] is None
    assert record["attempts"] == 2
    assert live.proxy.count("GET", live.key_of(location)) == 3


def test_storage_errors_that_outlast_every_retry_fail_with_storage_unavailable(
    live: Stack, photo: bytes
) -> None:
    (location,) = _inputs(live, photo, f"down-{uuid.uuid4().hex[:6]}", 1)
    live.proxy.fail(count=1000, match=live.key_of(location))
    (job_id,) = live.submit([{"input": location}])
    record = live.wait_final([job_id], timeout=FINISH_S)[job_id]
    assert record["status"] == "failed"
    assert record["error"]["code"] == "storage_unavailable"
    assert location in record["error"]["message"]
    assert "retrying" not in record["error"]["message"]
    assert record["attempts"] == MAX_ATTEMPTS
    assert not live.storage.exists(record["output"])


def test_a_missing_input_fails_at_once_without_a_retry(live: Stack) -> None:
    location = f"s3://{live.bucket}/missing-{uuid.uuid4().hex}.png"
    (job_id,) = live.submit([{"input": location}])
    record = live.wait_final([job_id], timeout=FINISH_S)[job_id]
    assert record["error"]["code"] == "input_not_found"
    assert record["attempts"] == 1
    assert live.proxy.count("GET", live.key_of(location)) == 1


def test_a_broken_image_fails_at_once_as_invalid_image(live: Stack) -> None:
    location = live.upload(f"broken-{uuid.uuid4().hex}.png", b"\x89PNG\r\n\x1a\n broken")
    (job_id,) = live.submit([{"input": location}])
    record = live.wait_final([job_id], timeout=FINISH_S)[job_id]
    assert record["error"]["code"] == "invalid_image" and record["attempts"] == 1


# --- 2. crash recovery ------------------------------------------------------------------


def test_a_worker_killed_mid_batch_has_its_jobs_finished_by_another_within_the_lease_bound(
    live: Stack, photo: bytes
) -> None:
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    inputs = _inputs(live, photo, prefix, 8)
    live.proxy.hold(f"/{prefix}/")
    job_ids = live.submit({"input": location} for location in inputs)
    poll_until(
        lambda: len(set(live.running_on(job_ids).values())) == WORKERS,
        timeout=60,
        what="both workers to be in the middle of jobs",
    )
    owners = live.running_on(job_ids)
    victim = live.worker_named(owners[next(iter(owners))])
    assert victim is not None
    orphans = [job_id for job_id, name in owners.items() if name == victim.name]

    victim.kill()
    killed_at = time.monotonic()
    live.proxy.release()
    poll_until(
        lambda: live.all_final(orphans),
        timeout=RECOVERY_BOUND_S,
        what=f"the killed worker's jobs to finish within {RECOVERY_BOUND_S:.0f}s",
    )
    recovery_s = time.monotonic() - killed_at
    records = live.wait_final(job_ids, timeout=FINISH_S)

    _assert_each_succeeded_once(live, records)
    assert all(records[job_id]["attempts"] == 2 for job_id in orphans)
    assert all(records[job_id]["worker"] != victim.name for job_id in orphans)
    print(f"\nFIGURE recovery after SIGKILL: {recovery_s:.1f}s for {len(orphans)} jobs")


def test_a_poison_photo_that_kills_every_worker_ends_failed_with_worker_lost(
    live: Stack, photo: bytes
) -> None:
    prefix = f"poison-{uuid.uuid4().hex[:6]}"
    (location,) = _inputs(live, photo, prefix, 1)
    live.proxy.hold(f"/{prefix}/")
    (job_id,) = live.submit([{"input": location}])
    for attempt in range(1, MAX_ATTEMPTS + 1):
        poll_until(
            lambda attempt=attempt: (
                live.records([job_id])[job_id]["attempts"] == attempt
                and job_id in live.running_on([job_id])
                and live.worker_named(live.running_on([job_id]).get(job_id)) is not None
            ),
            timeout=RECOVERY_BOUND_S,
            what=f"attempt {attempt} to be running",
        )
        victim = live.worker_named(live.running_on([job_id])[job_id])
        assert victim is not None
        victim.kill()
        live.ensure_workers(WORKERS)

    record = live.wait_final([job_id], timeout=RECOVERY_BOUND_S)[job_id]
    live.proxy.release()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "worker_lost"
    # The reaper fails it after its last attempt; or a redelivered message starts it once
    # more, and that start refuses it for having used up its attempts.
    assert record["attempts"] in (MAX_ATTEMPTS, MAX_ATTEMPTS + 1)
    assert record["error"]["message"]
    assert live.writes_of(record["output"]) == 0


# --- 3. outages -------------------------------------------------------------------------


def test_redis_restarted_mid_run_loses_no_job_and_finishes_none_twice(
    live: Stack, photo: bytes
) -> None:
    prefix = f"redis-{uuid.uuid4().hex[:6]}"
    held = _inputs(live, photo, f"{prefix}/held", 6)
    free = _inputs(live, photo, f"{prefix}/free", 10)
    live.proxy.hold(f"/{prefix}/held/")
    job_ids = live.submit({"input": location} for location in held + free)
    poll_until(
        lambda: len(live.running_on(job_ids)) >= 2,
        timeout=60,
        what="jobs to be running",
    )

    live.redis.restart()
    live.proxy.release()
    after = live.submit({"input": location, "effect": "blur"} for location in free[:4])

    records = live.wait_final(job_ids + after, timeout=FINISH_S)
    _assert_each_succeeded_once(live, records)
    assert all(worker.alive for worker in live.workers)


def test_postgres_restarted_mid_run_loses_no_job_and_finishes_none_twice(
    live: Stack, photo: bytes
) -> None:
    prefix = f"pg-{uuid.uuid4().hex[:6]}"
    inputs = _inputs(live, photo, prefix, 12)
    live.proxy.hold(f"/{prefix}/")
    job_ids = live.submit({"input": location} for location in inputs)
    poll_until(
        lambda: len(live.running_on(job_ids)) >= 2,
        timeout=60,
        what="jobs to be running",
    )

    live.postgres.stop()
    # The held jobs go on to find the database gone mid-job; queued ones find it gone at start.
    live.proxy.release()
    poll_until(
        lambda: "database_unavailable" in live.logs() or "database error" in live.logs(),
        timeout=60,
        what="the workers to notice the database is gone",
    )
    live.postgres.start()

    records = live.wait_final(job_ids, timeout=FINISH_S)
    _assert_each_succeeded_once(live, records)
    assert all(worker.alive for worker in live.workers)


def test_s3_failing_for_a_while_delays_jobs_but_every_one_succeeds(
    live: Stack, photo: bytes
) -> None:
    prefix = f"s3down-{uuid.uuid4().hex[:6]}"
    inputs = _inputs(live, photo, prefix, 6)
    live.proxy.fail(seconds=600, match=f"/{prefix}/")
    job_ids = live.submit({"input": location} for location in inputs)
    # Every job's first attempt fails (two botocore tries each) before the store comes back.
    poll_until(
        lambda: live.proxy.failed >= 2 * len(inputs),
        timeout=60,
        what="every job to meet the outage",
    )
    live.proxy.heal()

    records = live.wait_final(job_ids, timeout=FINISH_S)
    _assert_each_succeeded_once(live, records)
    assert all(record["attempts"] >= 2 for record in records.values())
