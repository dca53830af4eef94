"""Security promises, checked against a real worker, a real API and the wire:

bucket allow-list and local roots on every read and write (at submit and again in the
worker), no fetching of arbitrary URLs, JSON-only task messages, API tokens compared in
constant time and never logged, no output overwriting an input or another job's output,
and no secret in any log or job record.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from producer import jobs
from producer.db import session_scope
from producer.errors import AccessDenied, InvalidRequest
from producer.request import JobRequest
from producer.settings import Settings
from tests.stack import Stack, build_stack, small_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DB_PASSWORD = "db-secret-" + uuid.uuid4().hex[:8]
REDIS_PASSWORD = "redis-secret-" + uuid.uuid4().hex[:8]
AWS_SECRET = "aws-secret-" + uuid.uuid4().hex[:8]
API_TOKEN = "api-secret-" + uuid.uuid4().hex[:8]
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, AWS_SECRET, API_TOKEN)


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(
        tmp_path_factory.mktemp("security"),
        s3_server,
        mobilenet_weights,
        redis_password=REDIS_PASSWORD,
        db_password=DB_PASSWORD,  # trust auth ignores it; it is only there to leak, or not
        AWS_SECRET_ACCESS_KEY=AWS_SECRET,
    )
    try:
        stack.start_workers(1)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def photo(stack: Stack, photo_bytes: dict[str, bytes]) -> str:
    return stack.upload("security/photo.png", small_photo(photo_bytes["chelsea"]))


def _bypassing_the_client(stack: Stack, **fields: Any) -> str:
    """A job row written straight to the database, as if the API's checks had been skipped:
    the worker must refuse it on its own."""
    with session_scope(stack.settings.database_url) as session:
        (created,) = jobs.create(
            session,
            [JobRequest.model_construct(**_request_defaults(fields))],
            stack.settings.output_prefix,
        )
    from producer import broker

    broker.enqueue(stack.client.celery, [(created.job.id, "interactive")])
    return created.job.id


def _request_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    defaults = JobRequest(input="s3://placeholder/x.png").model_dump()
    return {**defaults, **fields}


@pytest.fixture
def url_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that records every request it gets (there should be none)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


# --- allow-list and roots ---------------------------------------------------------------


def test_a_bucket_outside_the_allow_list_is_refused_at_submit_for_inputs_and_outputs(
    stack: Stack, photo: str
) -> None:
    for request in (
        {"input": "s3://someone-elses-bucket/photo.png"},
        {"input": photo, "output": "s3://someone-elses-bucket/out.png"},
        {"input": photo, "mask_output": "s3://someone-elses-bucket/mask.png"},
        {"input": photo, "effect": "replace", "background": "s3://someone-elses-bucket/b.png"},
    ):
        with pytest.raises(AccessDenied):
            stack.client.submit(request)


def test_the_worker_itself_refuses_a_bucket_outside_the_allow_list(
    stack: Stack, photo: str
) -> None:
    read = _bypassing_the_client(stack, input="s3://someone-elses-bucket/photo.png")
    write = _bypassing_the_client(stack, input=photo, output="s3://someone-elses-bucket/o.png")
    records = stack.wait_final([read, write], timeout=60)
    assert {r["error"]["code"] for r in records.values()} == {"access_denied"}
    assert stack.proxy.count("GET", "/someone-elses-bucket") == 0
    assert stack.proxy.count("PUT", "/someone-elses-bucket") == 0


def test_file_locations_outside_the_roots_are_refused_at_submit_and_by_the_worker(
    stack: Stack, tmp_path: Path
) -> None:
    root = stack.settings.local_roots[0]
    Path(root).mkdir(parents=True, exist_ok=True)
    escape = Path(root) / f"escape-{uuid.uuid4().hex[:6]}"
    escape.symlink_to("/etc")
    for location in (
        "file:///etc/passwd",
        f"file://{root}/../../etc/passwd",
        f"file://{escape}/passwd",
    ):
        with pytest.raises(AccessDenied):
            stack.client.submit(input=location)
    job_ids = [
        _bypassing_the_client(stack, input="file:///etc/passwd"),
        _bypassing_the_client(stack, input=f"file://{escape}/passwd"),
    ]
    records = stack.wait_final(job_ids, timeout=60)
    assert {r["error"]["code"] for r in records.values()} == {"access_denied"}


def test_no_arbitrary_url_is_ever_fetched(
    stack: Stack, photo: str, url_server: tuple[str, list[str]]
) -> None:
    url, hits = url_server
    for request in (
        {"input": f"{url}/photo.png"},
        {"input": photo, "mask": f"{url}/mask.png"},
        {"input": photo, "effect": "replace", "background": f"{url}/bg.png"},
        {"input": f"s3://127.0.0.1:{url.rsplit(':', 1)[1]}@bucket/photo.png"},
        {"input": "gopher://127.0.0.1/x"},
    ):
        with pytest.raises((InvalidRequest, AccessDenied)):
            stack.client.submit(request)
    job_id = _bypassing_the_client(stack, input=f"{url}/photo.png")
    record = stack.wait_final([job_id], timeout=60)[job_id]
    assert record["status"] == "failed" and record["error"]["code"] == "invalid_request"
    assert hits == []


# --- task messages ----------------------------------------------------------------------


class _Exploit:
    """Unpickling this writes a file: proof that a pickle was trusted."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pickled_task_message_is_refused_and_never_unpickled(
    stack: Stack, photo: str, tmp_path: Path
) -> None:
    from producer.broker import TASK_NAME

    marker = tmp_path / "unpickled"
    assert pickle.dumps(_Exploit(marker))  # it would work, if anyone unpickled it
    stack.client.celery.send_task(
        TASK_NAME,
        args=[_Exploit(marker)],
        queue="interactive",
        routing_key="interactive",
        exchange="",
        serializer="pickle",
    )
    (after,) = stack.submit([{"input": photo}])
    assert stack.wait_final([after], timeout=60)[after]["status"] == "succeeded"
    (worker,) = stack.workers
    assert worker.alive
    assert not marker.exists()
    assert "untrusted content" in worker.log() or "pickle" in worker.log()


# --- API tokens -------------------------------------------------------------------------


def test_api_tokens_are_compared_in_constant_time_and_never_logged(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    from producer import api

    tokens = [API_TOKEN, "another-" + uuid.uuid4().hex]
    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", counting)
    settings = Settings(**{**stack.settings.model_dump(), "api_tokens": tokens})
    caplog.set_level(logging.DEBUG)
    with TestClient(api.create_app(settings, client=stack.client)) as http:
        for given, expected in ((API_TOKEN, 200), (API_TOKEN[:-1] + "x", 401), ("x", 401)):
            compared.clear()
            response = http.get("/v1/jobs", headers={"Authorization": f"Bearer {given}"})
            assert response.status_code == expected
            # Every configured token is compared, whether or not one matched early.
            assert len(compared) == len(tokens)
            assert API_TOKEN not in response.text
    assert API_TOKEN not in caplog.text
    assert API_TOKEN[:-1] not in caplog.text


# --- outputs ----------------------------------------------------------------------------


def test_an_output_can_never_overwrite_an_input_or_another_jobs_output(
    stack: Stack, photo: str
) -> None:
    mask = stack.upload("security/mask.png", small_photo(stack.storage.read(photo)))
    taken = f"s3://{stack.bucket}/security/out-{uuid.uuid4().hex[:6]}.png"
    key = f"k-{uuid.uuid4().hex}"
    first = stack.client.submit(input=photo, output=taken, idempotency_key=key)
    for request in (
        {"input": photo, "output": photo},
        {"input": photo, "mask": mask, "output": mask},
        {"input": photo, "effect": "replace", "background": mask, "output": mask},
        {"input": photo, "mask_output": photo},
        {"input": photo, "output": f"{taken}.x", "mask_output": f"{taken}.x"},
        {"input": photo, "output": taken},
    ):
        with pytest.raises(InvalidRequest):
            stack.client.submit(request)
    with pytest.raises(InvalidRequest):
        stack.client.submit_many([{"input": photo, "output": f"{taken}.2"}] * 2)
    again = stack.client.submit(input=photo, output=taken, idempotency_key=key)
    assert again["id"] == first["id"]
    record = stack.wait_final([first["id"]], timeout=60)[first["id"]]
    assert record["status"] == "succeeded"
    assert stack.writes_of(taken) == 1
    assert stack.writes_of(photo) == 0


# --- secrets ----------------------------------------------------------------------------


def test_no_secret_appears_in_any_log_or_job_record(stack: Stack, photo: str) -> None:
    stack.proxy.fail(count=1000, match="/security/unreachable")
    failing = stack.upload("security/unreachable.png", b"x")
    job_ids = stack.submit([{"input": photo, "effect": "blur"}, {"input": failing}])
    records = stack.wait_final(job_ids, timeout=120)
    stack.proxy.heal()
    with session_scope(stack.settings.database_url) as session:
        from sqlalchemy import select

        from producer.models import Job

        every_record = [job.to_record() for job in session.scalars(select(Job))]
    text = stack.logs() + repr(every_record) + repr(records)
    assert stack.workers[0].log()  # the worker did log
    for secret in SECRETS:
        assert secret not in text
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != AWS_SECRET
