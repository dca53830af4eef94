"""The lease keeper: requeues dead workers' jobs and gives message-less queued jobs a message."""

from __future__ import annotations

import json

import pytest
import redis

from producer import broker, jobs
from producer.db import session_scope
from producer.leases import LeaseKeeper
from producer.request import JobRequest
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.session_redis import REDIS_TEST_URL, redis_url_for_tests

pytestmark = pytest.mark.integration


@pytest.fixture
def keeper(db_url: str) -> LeaseKeeper:
    settings = Settings(database_url=db_url, broker_url=redis_url_for_tests(), job_lease_s=0.05)
    return LeaseKeeper(settings, broker.make_celery(settings))


def _queued_ids(queue: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def _create(db_url: str, queue: str = "interactive") -> str:
    with session_scope(db_url) as session:
        (created,) = jobs.create(
            session, [JobRequest(input="s3://bkt/k.png", queue=queue)], "s3://out"
        )
    return created.job.id


def test_a_queued_job_with_no_message_is_published_once_its_queue_is_empty(
    keeper: LeaseKeeper, db_url: str
) -> None:
    job_id = _create(db_url, "bulk")
    poll_until(lambda: keeper.republish_orphans() == [job_id], timeout=10, what="a republish")
    assert _queued_ids("bulk") == [job_id]
    # Its queue is no longer empty: nothing is published twice.
    assert keeper.republish_orphans() == []
    assert _queued_ids("bulk") == [job_id]


def test_a_dead_workers_job_is_requeued_with_a_new_message(
    keeper: LeaseKeeper, db_url: str
) -> None:
    job_id = _create(db_url)
    with session_scope(db_url) as session:
        jobs.start(session, job_id, "dead-worker", lease_s=-1)
    reaped = keeper.beat()
    assert reaped.requeued == [(job_id, "interactive")]
    assert _queued_ids("interactive") == [job_id]
    with session_scope(db_url) as session:
        assert jobs.get(session, job_id).status == "queued"


def test_a_job_waiting_out_its_retry_backoff_is_not_published_again(
    keeper: LeaseKeeper, db_url: str
) -> None:
    held, orphan = _create(db_url), _create(db_url)
    with session_scope(db_url) as session:
        attempt = jobs.start(session, held, "worker-a", lease_s=60).attempts
        jobs.release(session, held, attempt, "storage_unavailable", "503", hold_s=60)
    poll_until(lambda: keeper.republish_orphans() == [orphan], timeout=10, what="a republish")
    assert _queued_ids("interactive") == [orphan]


def test_an_attempt_that_overruns_the_job_timeout_loses_its_lease_and_is_requeued(
    db_url: str,
) -> None:
    settings = Settings(
        database_url=db_url, broker_url=redis_url_for_tests(), job_lease_s=60, job_timeout_s=50
    )
    clock = [1000.0]
    keeper = LeaseKeeper(settings, broker.make_celery(settings), clock=lambda: clock[0])
    stuck, busy = _create(db_url), _create(db_url)
    for job_id in (stuck, busy):
        with session_scope(db_url) as session:
            # Leases already run out: only a renewal in beat() keeps a job running.
            attempt = jobs.start(session, job_id, "this-worker", lease_s=-1).attempts
        keeper.hold(job_id, attempt)
        clock[0] += 40  # stuck started 80 s before the beat, busy 40 s
    reaped = keeper.beat()
    assert reaped.requeued == [(stuck, "interactive")]
    assert _queued_ids("interactive") == [stuck]
    with session_scope(db_url) as session:
        assert jobs.get(session, stuck).status == "queued"
        assert jobs.get(session, busy).status == "running"
