"""Hostile broker messages against a real worker (real Redis, real `backdrop worker`).

Whatever lands in a queue the worker consumes, it logs one warning, drops the message and
keeps serving: only our task ever runs, pickle is never deserialised, and nothing is held
unacknowledged for a far-future ETA. The embedded broker (a folder of message files) is
held to the same standard.
"""

from __future__ import annotations

import base64
import json
import pickle
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import jobs
from producer.broker import TASK_NAME
from producer.client import Client
from producer.db import session_scope, upgrade
from producer.request import JobRequest
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.services import WorkerProcess
from tests.support.session_redis import redis_url_for_tests
from tests.support.stack import Stack, build_stack, small_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DROPPED = "dropped a broker message"
MARKER = "accumulated-" + uuid.uuid4().hex[:8]


class Exploit:
    """Unpickling this creates a file: proof that a pickle was trusted."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def envelope(
    *,
    task: Any = TASK_NAME,
    args: Any = None,
    kwargs: Any = None,
    embed: Any = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    eta: str | None = None,
    headers: Any = None,
    properties: Any = None,
    task_id: str | None = None,
) -> dict[str, Any]:
    """A message as kombu's Redis transport stores it, Celery task protocol 2."""
    task_id = task_id or str(uuid.uuid4())
    if body is None:
        embed = embed or {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = json.dumps([args if args is not None else [task_id], kwargs or {}, embed]).encode()
    if headers is None:
        headers = {"lang": "py", "task": task, "id": task_id, "eta": eta, "retries": 0}
    if properties is None:
        properties = {
            "delivery_info": {"exchange": "", "routing_key": "interactive"},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": properties,
    }


def encoded(message: Any) -> bytes:
    return json.dumps(message).encode()


def in_days(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


def deeply_nested() -> bytes:
    return b"[" * 200_000 + b"]" * 200_000


# Each makes the raw bytes to push, given a path that must never be created.
ATTACKS: dict[str, Callable[[Path], bytes]] = {
    "not-json": (lambda _: b"not even json"),
    "binary": (lambda _: bytes(range(256)) * 4),
    "json-list": (lambda _: b"[1, 2, 3]"),
    "json-string": (lambda _: b'"hello"'),
    "json-null": (lambda _: b"null"),
    "deeply-nested-json": (lambda _: deeply_nested()),
    "no-properties": (lambda _: encoded({"body": "", "headers": {}})),
    "properties-not-a-dict": (lambda _: encoded(envelope(properties="x"))),
    "body-not-base64": (lambda _: encoded({**envelope(), "body": "%%% not base64 %%%"})),
    "unknown-body-encoding": (
        lambda _: encoded(
            envelope(properties={"body_encoding": "rot13", "delivery_tag": "t", "x": 1})
        )
    ),
    "headers-not-a-dict": (lambda _: encoded(envelope(headers="x"))),
    "task-name-not-a-string": (lambda _: encoded(envelope(task=["x"]))),
    "no-task-id": (lambda _: encoded(envelope(headers={"task": TASK_NAME}))),
    "body-not-json": (lambda _: encoded(envelope(body=b"{nope"))),
    "pickle": (
        lambda marker: encoded(
            envelope(
                body=pickle.dumps(((Exploit(marker),), {}, {})),
                content_type="application/x-python-serialize",
            )
        )
    ),
    "yaml": (lambda _: encoded(envelope(body=b"- a", content_type="application/x-yaml"))),
    "unknown-task": (lambda _: encoded(envelope(task="evil.task"))),
    "celery-accumulate": (lambda _: encoded(envelope(task="celery.accumulate", args=[MARKER]))),
    "protocol-1": (
        lambda _: encoded(
            envelope(
                headers={},
                body=json.dumps(
                    {"task": TASK_NAME, "id": "x", "args": [str(uuid.uuid4())], "kwargs": {}}
                ).encode(),
            )
        )
    ),
    "job-id-not-a-string": (lambda _: encoded(envelope(args=[12345]))),
    "job-id-not-a-uuid": (lambda _: encoded(envelope(args=["../../etc/passwd"]))),
    "two-args": (lambda _: encoded(envelope(args=[str(uuid.uuid4()), "x"]))),
    "kwargs": (lambda _: encoded(envelope(args=[], kwargs={"job_id": str(uuid.uuid4())}))),
    "callbacks": (
        lambda _: encoded(
            envelope(
                embed={"callbacks": [{"task": "celery.accumulate", "args": [MARKER], "kwargs": {}}]}
            )
        )
    ),
    "huge": (lambda _: encoded(envelope(args=["x" * 2_000_000]))),
    "far-future-eta": (lambda _: encoded(envelope(eta=in_days(3650)))),
    "unparsable-eta": (lambda _: encoded(envelope(eta="tomorrow"))),
}


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(tmp_path_factory.mktemp("messages"), s3_server, mobilenet_weights)
    try:
        stack.start_workers(1)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def live(stack: Stack) -> Stack:
    """The stack with one live worker (an attack on the old code killed it)."""
    stack.ensure_workers(1)
    return stack


@pytest.fixture(scope="module")
def photo(stack: Stack, photo_bytes: dict[str, bytes]) -> str:
    return stack.upload("messages/photo.png", small_photo(photo_bytes["chelsea"]))


def broker_client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis.url)


def dropped(log: str) -> list[str]:
    return [line for line in log.splitlines() if DROPPED in line]


def serves_a_job(stack: Stack, worker: WorkerProcess, photo: str) -> dict[str, Any]:
    """Submit a normal job and wait for it to end (or for the worker to die)."""
    (job_id,) = stack.submit([{"input": photo}])
    poll_until(
        lambda: stack.all_final([job_id]) or not worker.alive,
        timeout=60,
        what="a normal job after the attack",
    )
    return stack.records([job_id])[job_id]


def queued_job(stack: Stack, photo: str) -> str:
    """A queued job with no message on the broker (the test sends its own)."""
    with session_scope(stack.settings.database_url) as session:
        (created,) = jobs.create(session, [JobRequest(input=photo)], stack.settings.output_prefix)
    return created.job.id


@pytest.mark.parametrize("due_in_s", [None, 1.0])
def test_a_hand_built_message_for_a_real_job_runs_it_now_or_when_due(
    live: Stack, photo: str, due_in_s: float | None
) -> None:
    """The attacks below differ from this message only in their defect; a message due in a
    second is what a transient retry sends."""
    job_id, task_id = queued_job(live, photo), str(uuid.uuid4())
    eta = (datetime.now(UTC) + timedelta(seconds=due_in_s)).isoformat() if due_in_s else None
    message = envelope(args=[job_id], task_id=task_id, eta=eta)
    broker_client(live).lpush("interactive", encoded(message))
    record = live.wait_final([job_id], timeout=60)[job_id]
    assert record["status"] == "succeeded"
    assert f"{TASK_NAME}[{task_id}]" in live.workers[0].log()


def test_the_worker_still_answers_a_broadcast_ping(live: Stack) -> None:
    """Remote control (health checks, `backdrop stats`) goes through the same transport."""
    replies = live.client.celery.control.inspect(timeout=10).ping() or {}
    assert f"backdrop-{live.workers[0].pid}@{socket.gethostname()}" in replies


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_hostile_message_is_dropped_with_one_warning_and_the_worker_keeps_serving(
    name: str, live: Stack, photo: str, tmp_path: Path
) -> None:
    (worker,) = live.workers
    marker = tmp_path / "unpickled"
    start = len(worker.log())
    broker_client(live).lpush("interactive", ATTACKS[name](marker))
    poll_until(
        lambda: dropped(worker.log()[start:]) or not worker.alive,
        timeout=30,
        what="the worker to drop the message",
    )
    record = serves_a_job(live, worker, photo)

    assert worker.alive, worker.log()[start:][-3000:]
    assert record["status"] == "succeeded"
    log = worker.log()[start:]
    (warning,) = dropped(log)
    assert " WARNING " in warning and len(warning) < 1000
    for sign in (" ERROR ", " CRITICAL ", "Traceback"):
        assert sign not in log
    assert not marker.exists()
    assert MARKER not in log.replace(warning, "")
    # Nothing stays held unacknowledged (a far-future ETA would sit in the worker's memory).
    assert broker_client(live).hlen("unacked") == 0


def test_the_embedded_broker_survives_garbage_files_in_its_queue_folder(
    mobilenet_weights: Path, tmp_path: Path, photo_bytes: dict[str, bytes]
) -> None:
    data_dir = tmp_path / "data"
    env = {
        "BACKDROP_DATA_DIR": str(data_dir),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    settings = Settings(data_dir=data_dir)
    upgrade(settings.database_url)
    client = Client(Services(settings))
    photo = f"{settings.input_prefix}/photo.png"
    client.storage.write(photo, small_photo(photo_bytes["coffee"]), content_type="image/png")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        queue = settings.broker_folder / "queue"
        garbage = [b"not even json", b"[1, 2, 3]", deeply_nested(), encoded(envelope(task="x"))]
        for n, content in enumerate(garbage):
            (queue / f"{n:04d}_{uuid.uuid4()}.interactive.msg").write_bytes(content)
        poll_until(
            lambda: len(dropped(worker.log())) == len(garbage) or not worker.alive,
            timeout=60,
            what="the worker to drop the garbage files",
        )
        job = client.submit(input=photo)
        poll_until(
            lambda: client.get(job["id"])["status"] == "succeeded" or not worker.alive,
            timeout=120,
            what="a job after the garbage",
        )
        assert worker.alive, worker.log()[-3000:]
        assert client.get(job["id"])["status"] == "succeeded"
        assert len(dropped(worker.log())) == len(garbage)
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()


def test_a_channel_left_over_from_a_closed_connection_raises_a_connection_error() -> None:
    """When Redis restarts, Celery closes the lost connection while one of its channels may
    still be reconnecting; that channel must report a connection error (Celery reconnects)
    rather than an AttributeError (Celery calls it unrecoverable and the worker dies)."""
    from kombu import Connection

    from worker.messages import RedisTransport

    connection = Connection(redis_url_for_tests(), transport=RedisTransport)
    channel = connection.channel()
    channel.client.ping()
    connection.close()
    channel._pool = None  # as after the lost connection: the next command builds a new pool

    with pytest.raises(redis.ConnectionError), channel.conn_or_acquire() as client:
        client.ping()
