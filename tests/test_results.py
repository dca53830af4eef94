"""Results over HTTP against real services: S3 outputs read back through presigned URLs
fetched over plain HTTP from moto's server and through GET /v1/jobs/{id}/output, and
POST /v1/process answered by a real `backdrop worker` process."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from producer.services import Services
from producer.settings import Settings
from tests.support.api import AUTH, TOKEN, api_app
from tests.support.polling import poll_until
from tests.support.services import S3_TEST_CREDENTIALS, WorkerProcess
from tests.support.session_redis import redis_url_for_tests
from tests.support.stack import small_photo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(
    postgres_url: str,
    s3_server: str,
    mobilenet_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    bucket = f"results-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {
        "BACKDROP_DATABASE_URL": postgres_url,
        "BACKDROP_BROKER_URL": redis_url_for_tests(),
        "BACKDROP_S3_ENDPOINT_URL": s3_server,
        "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
        "BACKDROP_INPUT_PREFIX": f"s3://{bucket}/in",
        "BACKDROP_ALLOWED_BUCKETS": bucket,
        "BACKDROP_DATA_DIR": str(tmp_path_factory.mktemp("results-data")),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_API_TOKENS": TOKEN,
        "OMP_NUM_THREADS": "1",
        **S3_TEST_CREDENTIALS,
    }


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> Settings:
    fields = {
        k.removeprefix("BACKDROP_").lower(): v for k, v in env.items() if k.startswith("BACKDROP_")
    }
    return Settings(**fields)


@pytest.fixture(scope="module")
def worker(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        env, tmp_path_factory.mktemp("results-worker") / "worker.log", concurrency=2
    )
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


@pytest.fixture
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(api_app(settings)) as client:
        yield client


def stored(settings: Settings, location: str) -> bytes:
    return Services(settings).storage.read(location)


def upload(settings: Settings, photo: bytes) -> str:
    location = f"{settings.input_prefix}/{uuid.uuid4()}.png"
    Services(settings).storage.write(location, photo, content_type="image/png")
    return location


def finished(http: TestClient, job_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        record = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        return record if record["status"] in ("succeeded", "failed", "canceled") else None

    poll_until(final, timeout=120, what=f"job {job_id} to finish")
    record = final()
    assert record is not None
    return record


def test_an_s3_output_is_read_through_its_presigned_url_and_the_output_route(
    http: TestClient, settings: Settings, worker: WorkerProcess, photo_bytes: dict[str, bytes]
) -> None:
    photo = upload(settings, small_photo(photo_bytes["chelsea"]))
    mask = f"{settings.output_prefix}/{uuid.uuid4()}-mask.png"
    submitted = http.post(
        "/v1/jobs",
        json={"input": photo, "mask_output": mask, "fail_on_no_subject": False},
        headers=AUTH,
    ).json()
    assert submitted["output_url"] is None  # nothing to read yet
    record = finished(http, submitted["id"])
    assert record["status"] == "succeeded", record["error"]

    output, saved_mask = stored(settings, record["output"]), stored(settings, mask)
    # Plain HTTP, no credentials: what a pipeline without S3 access does with the record.
    assert httpx.get(record["output_url"]).content == output
    assert httpx.get(record["mask_url"]).content == saved_mask
    assert httpx.get(record["output_url"].split("?")[0]).status_code == 403
    served = http.get(f"/v1/jobs/{record['id']}/output", headers=AUTH)
    assert served.content == output and served.headers["content-type"] == "image/png"
    assert http.get(f"/v1/jobs/{record['id']}/output?mask=1", headers=AUTH).content == saved_mask


def test_an_upload_is_answered_with_the_image_a_real_worker_made(
    http: TestClient, settings: Settings, worker: WorkerProcess, photo_bytes: dict[str, bytes]
) -> None:
    photo = small_photo(photo_bytes["chelsea"], size=(120, 80))
    response = http.post(
        "/v1/process",
        files={"image": ("chelsea.png", photo, "image/png")},
        data={"format": "webp", "fail_on_no_subject": "false", "timeout": "120"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "WEBP" and image.size == (120, 80)
    record = http.get(f"/v1/jobs/{response.headers['backdrop-job-id']}", headers=AUTH).json()
    assert record["queue"] == "interactive" and record["input"].startswith(settings.input_prefix)
    assert stored(settings, record["input"]) == photo
    assert stored(settings, record["output"]) == response.content


def test_an_upload_that_is_no_image_is_answered_with_the_jobs_invalid_image_error(
    http: TestClient, worker: WorkerProcess
) -> None:
    response = http.post(
        "/v1/process",
        files={"image": ("notes.png", b"not an image at all", "image/png")},
        data={"timeout": "120"},
        headers=AUTH,
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_image"
    assert response.headers["backdrop-job-id"]
