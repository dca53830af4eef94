"""The Celery app both sides share, and how jobs are put on the queue.

The producer only sends task messages by name, so it never imports the worker (or torch).
Messages carry nothing but the job id: the database is the source of truth for the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from kombu import Queue

from producer.errors import TransientError
from producer.request import Queue as QueueName
from producer.settings import Settings, get_settings

TASK_NAME = "backdrop.process_job"
QUEUE_NAMES = [QueueName.INTERACTIVE.value, QueueName.BULK.value]
PUBLISH_BATCH = 1000
# A transient retry is published due at most this far ahead (workers refuse messages due
# much later: worker/messages.py).
MAX_RETRY_DELAY_S = 60.0


class BrokerUnavailable(TransientError):
    """The broker refused or dropped a publish: the jobs were not queued."""

    code = "broker_unavailable"


def make_celery(settings: Settings) -> Celery:
    app = Celery("backdrop", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {
        # Longer than any job may take, or the broker hands a slow job to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        # Messages a dead worker had taken but not acknowledged come back once the visibility
        # timeout has passed, but only when some worker scans for them: kombu's default scans
        # every 10th tick of 10 s (~100 s late). Scan each tick, ticks a fifth of the timeout
        # apart (at most 10 s), so redelivery lags the timeout by little.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 5)),
        "unacked_restore_throttle": 1,
        # Always drain `interactive` first so a backfill never starves it.
        "queue_order_strategy": "priority",
    }
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),
            store_processed=False,
        )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only once its record is final; a worker that dies mid-job
        # leaves the message to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, routing_key=name) for name in QUEUE_NAMES],
        task_default_queue=QueueName.INTERACTIVE.value,
        task_default_routing_key=QueueName.INTERACTIVE.value,
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        # Off: publishing three events per job cost ~5% of a CPU worker. Flower, when it
        # runs, switches them on remotely (its enable_events broadcast).
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue(app: Celery, jobs: Sequence[tuple[str, str]]) -> None:
    """Publish one task per (job id, queue) through one connection, pipelined where the
    transport can (Redis: one pipeline per PUBLISH_BATCH messages)."""
    if not jobs:
        return
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for job_id, queue in jobs:
            app.send_task(
                TASK_NAME,
                args=[job_id],
                task_id=job_id,
                queue=queue,
                routing_key=queue,
                # The default exchange routes straight to the list named by the routing key:
                # no binding table to look up per message, and none to lose if Redis restarts.
                exchange="",
                producer=producer,
            )
