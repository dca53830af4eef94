"""The Celery app both sides share, and how jobs are put on the queue.

The producer only sends task messages by name, so it never imports the worker (or torch).
Messages carry nothing but the job id: the database is the source of truth for the request.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import Queue
from kombu.transport import redis
from kombu.utils.json import dumps

from producer.request import Queue as QueueName
from producer.settings import Settings

TASK_NAME = "backdrop.process_job"
QUEUE_NAMES = [QueueName.INTERACTIVE.value, QueueName.BULK.value]
PUBLISH_BATCH = 1000
# A transient retry is published due at most this far ahead (workers refuse messages due
# much later: worker/messages.py).
MAX_RETRY_DELAY_S = 60.0


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


def enqueue(app: Celery, jobs: Sequence[tuple[str, str]]) -> None:
    """Publish one task per (job id, queue) through one connection, pipelined where the
    transport can (Redis: one LPUSH per queue per PUBLISH_BATCH messages)."""
    if not jobs:
        return
    with app.producer_or_acquire() as producer:
        connection = producer.connection
        if isinstance(connection.transport, redis.Transport):
            # Connect as send_task would: a down broker fails within a second, not kombu's
            # default of several.
            connection.ensure_connection(**app.conf.task_publish_retry_policy)
            _push(app, connection.default_channel, jobs)
            return
        with producer.batch(max_size=PUBLISH_BATCH):
            for job_id, queue in jobs:
                app.send_task(
                    TASK_NAME,
                    args=[job_id],
                    task_id=job_id,
                    queue=queue,
                    routing_key=queue,
                    # The default exchange routes straight to the list named by the routing
                    # key: no binding table to look up per message, and none to lose if
                    # Redis restarts.
                    exchange="",
                    producer=producer,
                )


def _push(app: Celery, channel: redis.Channel, jobs: Sequence[tuple[str, str]]) -> None:
    """What send_task and kombu's Redis transport write for these jobs, ~20x cheaper: kombu
    spends ~0.3 ms of CPU on each message, which capped bulk submission near 1,000 jobs/s.
    Priority 0 messages live in the list named after their queue, each pushed on the left
    (one LPUSH of many values keeps their order)."""
    origin, reply_to = anon_nodename(), app.thread_oid
    with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipeline:
        for start_at in range(0, len(jobs), PUBLISH_BATCH):
            by_queue: dict[str, list[str]] = {}
            for job_id, queue in jobs[start_at : start_at + PUBLISH_BATCH]:
                message = task_message(job_id, queue, origin=origin, reply_to=reply_to)
                by_queue.setdefault(queue, []).append(dumps(message))
            for queue, messages in by_queue.items():
                pipeline.lpush(queue, *messages)
            pipeline.execute()


def task_message(job_id: str, queue: str, *, origin: str, reply_to: str) -> dict[str, Any]:
    """The Celery protocol-2 message of one job, exactly as `app.send_task` (through kombu's
    Redis transport) stores it; tests/test_jobs.py compares the two byte for byte."""
    body = dumps(
        [[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": repr([job_id]),
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
