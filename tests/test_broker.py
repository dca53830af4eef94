"""Task messages as the producer writes them to Redis: what Celery's send_task would write,
and what a worker's message guard (worker/messages.py) accepts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from producer import broker
from producer.settings import Settings
from tests.support.session_redis import redis_url_for_tests
from worker.messages import check_envelope, check_task

pytestmark = pytest.mark.integration


@pytest.fixture
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    settings = Settings(broker_url=redis_url_for_tests(), data_dir=tmp_path_factory.mktemp("data"))
    app = broker.make_celery(settings)
    yield app
    app.close()


def queued(app: Celery, queue: str) -> list[bytes]:
    """The queue's raw messages, oldest (next to be delivered) first."""
    return list(reversed(redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)))


def without_delivery_tag(raw: bytes) -> bytes:
    tag = json.loads(raw)["properties"]["delivery_tag"]
    return raw.replace(tag.encode(), b"TAG")


def test_a_job_is_queued_byte_for_byte_as_celery_send_task_queues_it(app: Celery) -> None:
    job_id = str(uuid.uuid4())
    broker.enqueue(app, [(job_id, "bulk")])
    with app.producer_or_acquire() as producer:
        app.send_task(
            broker.TASK_NAME,
            args=[job_id],
            task_id=job_id,
            queue="bulk",
            routing_key="bulk",
            exchange="",
            producer=producer,
        )
    ours, celerys = queued(app, "bulk")
    assert without_delivery_tag(ours) == without_delivery_tag(celerys)
    assert (
        json.loads(ours)["properties"]["delivery_tag"]
        != json.loads(celerys)["properties"]["delivery_tag"]
    )


def test_every_message_of_a_bulk_enqueue_is_accepted_by_the_worker_guard_in_order(
    app: Celery,
) -> None:
    jobs = [(str(uuid.uuid4()), "bulk" if i % 3 else "interactive") for i in range(2500)]
    broker.enqueue(app, jobs)
    delivered = {queue: queued(app, queue) for queue in broker.QUEUE_NAMES}
    assert sum(len(messages) for messages in delivered.values()) == len(jobs)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue, raws in delivered.items():
            ids = []
            for raw in raws:
                payload = json.loads(raw)
                check_envelope(payload)
                message = channel.Message(payload, channel=channel)
                check_task(message)
                assert message.delivery_info["routing_key"] == queue
                ids.append(message.headers["id"])
            assert ids == [job_id for job_id, name in jobs if name == queue]
