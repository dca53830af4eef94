"""Security promises, checked against a real worker, a real API and the wire:

bucket allow-list and local roots on every read and write (at submit and again in the
worker), no fetching of arbitrary URLs, JSON-only task messages, API tokens compared in
constant time and never logged, no output overwriting an input or another job's output
(under any spelling of it), no job reaching Backdrop's own database or broker folder, no
output replacing a file its job did not write unless asked, bounded and strictly typed
requests, no control character in a request or a log line, and no secret in any log or
job record.
"""

from __future__ import annotations

import logging
import pickle
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from producer import broker, jobs
from producer.client import Client
from producer.db import get_engine, session_scope, upgrade
from producer.errors import AccessDenied, InvalidRequest
from producer.models import Job
from producer.request import JobRequest
from producer.services import Services
from producer.settings import Settings
from producer.storage import Storage
from tests.support.services import WorkerProcess
from tests.support.stack import Stack, build_stack, small_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DB_PASSWORD = "db-secret-" + uuid.uuid4().hex[:8]
REDIS_PASSWORD = "redis-secret-" + uuid.uuid4().hex[:8]
AWS_SECRET = "aws-secret-" + uuid.uuid4().hex[:8]
API_TOKEN = "api-secret-" + uuid.uuid4().hex
WORKER_SECRETS = (DB_PASSWORD, REDIS_PASSWORD, AWS_SECRET)  # in the worker's environment
SECRETS = (*WORKER_SECRETS, API_TOKEN)


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

    monkeypatch.setattr(hmac, "compare_digest", counting)
    settings = Settings(**{**stack.settings.model_dump(), "api_tokens": tokens})
    caplog.set_level(logging.DEBUG)
    with TestClient(
        api.create_app(Services(settings, storage=stack.storage, celery=stack.client.celery))
    ) as http:
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
        every_record = [job.to_record() for job in session.scalars(select(Job))]
    text = stack.logs() + repr(every_record) + repr(records)
    # Both paths ran (a result and a failure), in a worker that held every secret.
    assert [records[job_id]["status"] for job_id in job_ids] == ["succeeded", "failed"]
    worker_environment = Path(f"/proc/{stack.workers[0].pid}/environ").read_bytes().decode()
    assert stack.workers[0].log()  # the worker did log
    for secret in WORKER_SECRETS:
        assert secret in worker_environment
    for secret in SECRETS:
        assert secret not in text


# --- the embedded default: locations, internal state, clobbering, logs (issue 11) -------

FORGED = "2099-01-01 00:00:00,000 INFO [job=forged] worker.tasks: forged line"


@dataclass
class Embedded:
    """`backdrop` on the embedded default (SQLite and the broker folder in the data dir,
    local storage), with a real worker, used as a token holder would use it."""

    data: Path
    settings: Settings
    client: Client
    worker: WorkerProcess
    photo: str

    def location(self, tail: str) -> str:
        return f"{self.data.as_uri()}/{tail}"

    def wait_final(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {record["id"]: record for record in self.client.wait(job_ids, timeout=120)}

    def job_count(self) -> int:
        with session_scope(self.settings.database_url) as session:
            return session.scalar(select(func.count()).select_from(Job)) or 0


@pytest.fixture(scope="module")
def embedded(
    mobilenet_weights: Path, photo_bytes: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Embedded]:
    folder = tmp_path_factory.mktemp("embedded")
    data = folder / "data"
    env = {
        # Empty: the embedded defaults, whatever the test process's environment says.
        "BACKDROP_DATABASE_URL": "",
        "BACKDROP_BROKER_URL": "",
        "BACKDROP_LOCAL_ROOTS": "",
        "BACKDROP_INPUT_PREFIX": "",
        "BACKDROP_OUTPUT_PREFIX": "",
        "BACKDROP_DATA_DIR": str(data),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "2",
        "OMP_NUM_THREADS": "1",
    }
    settings = Settings(
        data_dir=data,
        model="deeplabv3_mobilenet_v3_large",
        weights=str(mobilenet_weights),
        api_tokens=[API_TOKEN],
    )
    upgrade(settings.database_url)
    (data / "inputs").mkdir(parents=True)
    (data / "inputs" / "photo.png").write_bytes(small_photo(photo_bytes["chelsea"]))
    worker = WorkerProcess(env, folder / "worker.log", concurrency=2).start()
    try:
        worker.wait_ready()
        client = Client(
            Services(settings, storage=Storage(settings), celery=broker.make_celery(settings))
        )
        yield Embedded(data, settings, client, worker, (data / "inputs" / "photo.png").as_uri())
    finally:
        worker.stop()
        get_engine(settings.database_url).dispose()


def _written_directly(embedded: Embedded, **fields: Any) -> str:
    """A job row written straight to the database, skipping the submit-time checks."""
    with session_scope(embedded.settings.database_url) as session:
        (created,) = jobs.create(
            session,
            [JobRequest.model_construct(**_request_defaults(fields))],
            embedded.settings.output_prefix,
        )
    broker.enqueue(embedded.client.celery, [(created.job.id, "interactive")])
    return created.job.id


@pytest.mark.parametrize(
    "alias", ["inputs/./photo.png", "inputs//photo.png", "inputs/%70hoto.png", "./inputs/photo.png"]
)
def test_an_alias_of_the_input_cannot_be_the_output_or_the_mask_output(
    embedded: Embedded, alias: str
) -> None:
    before = embedded.job_count()
    for field in ("output", "mask_output"):
        with pytest.raises(InvalidRequest, match="must not overwrite"):
            embedded.client.submit(input=embedded.photo, **{field: embedded.location(alias)})
    assert embedded.job_count() == before


def test_two_jobs_cannot_own_one_output_under_two_spellings(embedded: Embedded) -> None:
    name = f"outputs/alias-{uuid.uuid4().hex[:6]}.png"
    first = embedded.client.submit(input=embedded.photo, output=embedded.location(name))
    assert first["output"] == embedded.location(name)
    for alias in (name.replace("/", "//"), name.replace("/", "/./"), name.replace("a", "%61", 1)):
        with pytest.raises(InvalidRequest, match="already belongs to another job"):
            embedded.client.submit(input=embedded.photo, output=embedded.location(alias))
    with pytest.raises(InvalidRequest, match="mask_output must not overwrite"):
        embedded.client.submit(
            input=embedded.photo,
            output=embedded.location("outputs/o.png"),
            mask_output=embedded.location("outputs//./o.png"),
        )
    assert embedded.wait_final([first["id"]])[first["id"]]["status"] == "succeeded"


@pytest.mark.parametrize("tail", ["backdrop.db", "backdrop.db-wal", "broker/queue/evil.msg"])
def test_the_database_and_broker_folder_are_neither_inputs_nor_outputs(
    embedded: Embedded, tail: str
) -> None:
    internal = embedded.location(tail)
    for request in (
        {"input": internal},
        {"input": embedded.photo, "output": internal},
        {"input": embedded.photo, "mask_output": internal},
        {"input": embedded.photo, "effect": "replace", "background": internal},
    ):
        with pytest.raises(AccessDenied):
            embedded.client.submit(request)


def test_the_worker_itself_never_writes_over_the_database_or_into_the_broker_folder(
    embedded: Embedded,
) -> None:
    database = embedded.data / "backdrop.db"
    job_ids = [
        _written_directly(embedded, input=embedded.photo, output=database.as_uri()),
        _written_directly(
            embedded, input=embedded.photo, output=embedded.location("broker/queue/evil.msg")
        ),
        _written_directly(embedded, input=database.as_uri()),
    ]
    records = embedded.wait_final(job_ids)
    assert {r["error"]["code"] for r in records.values()} == {"access_denied"}
    assert database.read_bytes().startswith(b"SQLite format 3\x00")
    assert not (embedded.data / "broker" / "queue" / "evil.msg").exists()
    after = embedded.client.submit(input=embedded.photo)
    assert embedded.wait_final([after["id"]])[after["id"]]["status"] == "succeeded"
    assert embedded.worker.alive


def test_an_output_never_replaces_a_file_it_did_not_write_unless_asked(
    embedded: Embedded,
) -> None:
    precious = embedded.data / "outputs" / f"precious-{uuid.uuid4().hex[:6]}.png"
    precious.parent.mkdir(parents=True, exist_ok=True)
    precious.write_bytes(b"someone else's work")
    job = embedded.client.submit(input=embedded.photo, output=precious.as_uri())
    record = embedded.wait_final([job["id"]])[job["id"]]
    assert record["status"] == "failed" and record["error"]["code"] == "output_exists"
    assert "overwrite" in record["error"]["message"]
    assert precious.read_bytes() == b"someone else's work"

    embedded.client.retry(job["id"], overwrite=True)
    assert embedded.wait_final([job["id"]])[job["id"]]["status"] == "succeeded"
    assert precious.read_bytes().startswith(b"\x89PNG")

    asked = embedded.data / "outputs" / f"asked-{uuid.uuid4().hex[:6]}.png"
    asked.write_bytes(b"to be replaced")
    job = embedded.client.submit(input=embedded.photo, output=asked.as_uri(), overwrite=True)
    assert embedded.wait_final([job["id"]])[job["id"]]["status"] == "succeeded"
    assert asked.read_bytes().startswith(b"\x89PNG")


def test_a_retry_rewrites_the_output_its_first_attempt_wrote(embedded: Embedded) -> None:
    name = uuid.uuid4().hex[:6]
    output = embedded.data / "outputs" / f"{name}.png"
    blocker = embedded.data / "outputs" / f"{name}-blocker"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file where the mask's folder should be")
    job = embedded.client.submit(
        input=embedded.photo,
        output=output.as_uri(),
        mask_output=(blocker / "mask.png").as_uri(),
    )
    record = embedded.wait_final([job["id"]])[job["id"]]
    assert record["status"] == "failed" and output.exists()  # the output went, the mask not
    blocker.unlink()
    embedded.client.retry(job["id"])
    assert embedded.wait_final([job["id"]])[job["id"]]["status"] == "succeeded"
    assert (blocker / "mask.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "request_fields",
    [
        {"input": "file:///" + "a/" * 2_500_000 + "photo.png"},
        {"input": "s3://photos/" + "k" * 1025},
        {"input": "s3://photos/in.jpg", "output": "s3://photos/" + "é" * 513},
    ],
    ids=["5 MB file location", "1025-byte key", "1026-byte UTF-8 key"],
)
def test_oversized_locations_are_refused_at_submit_and_never_stored(
    embedded: Embedded, request_fields: dict[str, Any]
) -> None:
    before = embedded.job_count()
    with pytest.raises(InvalidRequest) as raised:
        embedded.client.submit(request_fields)
    assert len(raised.value.message) < 400
    with _http(embedded) as http:
        response = http.post("/v1/jobs", json=request_fields, headers=_auth())
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] == "invalid_request"
    assert len(response.text) < 1000
    assert embedded.job_count() == before


@pytest.mark.parametrize(
    "fields",
    [
        {"background": "#FFFFFF\n"},
        {"jpeg_quality": "50"},
        {"jpeg_quality": True},
        {"effect": "blur", "blur_strength": True},
        {"fail_on_no_subject": "yes"},
        {"idempotency_key": "key\r\nX-Forged: 1"},
        {"classes": ["person\x1b[2J"]},
        {"output": "file:///tmp/out\n.png"},
    ],
)
def test_wrong_types_and_control_characters_are_refused_by_the_api(
    embedded: Embedded, fields: dict[str, Any]
) -> None:
    before = embedded.job_count()
    with _http(embedded) as http:
        response = http.post("/v1/jobs", json={"input": embedded.photo, **fields}, headers=_auth())
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert embedded.job_count() == before


def test_a_location_cannot_forge_lines_in_the_worker_log(embedded: Embedded) -> None:
    hostile = embedded.location(f"inputs/x\n{FORGED}\x1b[2J.png")
    with pytest.raises(InvalidRequest, match="control character"):
        embedded.client.submit(input=hostile)
    job_id = _written_directly(embedded, input=hostile)
    record = embedded.wait_final([job_id])[job_id]
    assert record["status"] == "failed" and record["error"]["code"] == "invalid_request"
    lines = embedded.worker.log().splitlines()
    assert not any(line.startswith(FORGED[:10]) for line in lines)
    assert not any("\x1b" in line for line in lines)
    assert any(job_id in line and "forged line" in line for line in lines)  # escaped, kept


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def _http(embedded: Embedded) -> TestClient:
    from producer import api

    return TestClient(api.create_app(embedded.client.services))


# --- S3 keys (issue 11) ------------------------------------------------------------------


def test_s3_keys_with_dot_segments_are_refused_at_submit_and_never_sent(
    stack: Stack, photo: str
) -> None:
    sneaky = f"s3://{stack.bucket}/security/../../someone-elses-bucket/photo.png"
    for request in ({"input": sneaky}, {"input": photo, "output": sneaky}):
        with pytest.raises(AccessDenied):
            stack.client.submit(request)
    job_ids = [
        _bypassing_the_client(stack, input=sneaky),
        _bypassing_the_client(stack, input=photo, output=sneaky),
        _bypassing_the_client(stack, input=photo, output=f"s3://{stack.bucket}/a//b.png"),
    ]
    records = stack.wait_final(job_ids, timeout=60)
    assert {r["error"]["code"] for r in records.values()} <= {"access_denied", "invalid_request"}
    assert stack.proxy.count("GET", "/..") == stack.proxy.count("PUT", "/..") == 0
    assert stack.proxy.count("PUT", "a//b.png") == 0
    assert stack.proxy.count("GET", "someone-elses-bucket") == 0


def test_a_listed_key_with_control_characters_fails_alone_and_forges_no_log_line(
    stack: Stack, photo: str, s3_server: str
) -> None:
    import boto3

    from producer.backfill import BackfillRunner

    prefix = f"security/listed-{uuid.uuid4().hex[:6]}"
    data = stack.storage.read(photo)
    good = stack.upload(f"{prefix}/good.png", data)
    # Any S3 client may store such a key (moto's server takes \r, not \n); Backdrop's own
    # storage refuses to name it.
    boto3.session.Session().client("s3", endpoint_url=s3_server).put_object(
        Bucket=stack.bucket, Key=f"{prefix}/bad\r{FORGED}\x1b[2J.png", Body=data
    )
    engine = BackfillRunner(
        Services(stack.settings, storage=stack.storage, celery=stack.client.celery)
    )
    created = engine.create(
        f"s3://{stack.bucket}/{prefix}/", f"s3://{stack.bucket}/{prefix}-out", {"effect": "remove"}
    )
    record = engine.run(created["id"])
    assert record["status"] == "completed"
    assert (record["counts"]["succeeded"], record["counts"]["failed"]) == (1, 1)
    report = stack.storage.read(record["report"]).decode()
    assert "invalid_request" in report and "control character" in report
    assert good.rsplit("/", 1)[-1] not in report
    lines = stack.logs().splitlines()
    assert not any(line.startswith(FORGED[:10]) for line in lines)
    assert not any("\x1b" in line for line in lines)


def test_a_backfill_owns_its_outputs_under_their_canonical_names(embedded: Embedded) -> None:
    from producer.backfill import BackfillRunner

    name = f"bf-{uuid.uuid4().hex[:6]}"
    source = embedded.data / "inputs" / name
    source.mkdir(parents=True)
    (source / "photo.png").write_bytes(embedded.client.storage.read(embedded.photo))
    engine = BackfillRunner(
        Services(embedded.settings, storage=embedded.client.storage, celery=embedded.client.celery)
    )
    created = engine.create(
        source.as_uri() + "/", embedded.location(f"outputs//./{name}-out/"), {"effect": "blur"}
    )
    assert created["output_prefix"] == embedded.location(f"outputs/{name}-out")
    assert engine.run(created["id"])["counts"]["succeeded"] == 1
    with pytest.raises(InvalidRequest, match="already belongs to another job"):
        embedded.client.submit(
            input=embedded.photo, output=embedded.location(f"outputs/{name}-out/photo.png")
        )
