"""End to end through real services: PostgreSQL, Redis, an HTTP S3 endpoint and a real
`backdrop worker` (Celery) process running a random-init DeepLabV3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from producer import broker, jobs
from producer.client import Client
from producer.db import session_scope
from producer.request import JobRequest
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.services import WorkerProcess
from tests.support.session_redis import redis_url_for_tests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline_env(
    postgres_url: str,
    s3_server: str,
    mobilenet_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The environment a worker and the producer share."""
    bucket = f"pipeline-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("backdrop-data")
    env = {
        "BACKDROP_DATABASE_URL": postgres_url,
        "BACKDROP_BROKER_URL": redis_url_for_tests(),
        "BACKDROP_S3_ENDPOINT_URL": s3_server,
        "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
        "BACKDROP_INPUT_PREFIX": f"s3://{bucket}/in",
        "BACKDROP_ALLOWED_BUCKETS": bucket,
        "BACKDROP_DATA_DIR": str(data_dir),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_MODEL_INPUT_SIZE": "256",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "4",
        "BACKDROP_MAX_WAIT_MS": "50",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    env["BUCKET"] = bucket
    return env


@pytest.fixture(scope="module")
def settings(pipeline_env: dict[str, str]) -> Settings:
    fields = {
        key.removeprefix("BACKDROP_").lower(): value
        for key, value in pipeline_env.items()
        if key.startswith("BACKDROP_")
    }
    return Settings(**fields)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Client:
    return Client(Services(settings))


@pytest.fixture(scope="module")
def worker_process(
    pipeline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real `backdrop worker` subprocess; yields its log file."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with WorkerProcess(pipeline_env, log_path, concurrency=6):
        yield log_path


def _upload(client: Client, bucket: str, key: str, data: bytes) -> str:
    location = f"s3://{bucket}/{key}"
    client.storage.write(location, data, content_type="application/octet-stream")
    return location


def _as(fmt: str, data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _decoded_size(client: Client, location: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(client.storage.read(location))).size


def test_a_mixed_batch_all_succeeds_with_outputs_at_full_size_and_complete_records(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    bucket = pipeline_env["BUCKET"]
    astronaut = _upload(client, bucket, "in/astronaut.jpg", _as("JPEG", photo_bytes["astronaut"]))
    chelsea = _upload(client, bucket, "in/chelsea.png", photo_bytes["chelsea"])
    coffee = _upload(client, bucket, "in/coffee.webp", _as("WEBP", photo_bytes["coffee"]))
    moto = _upload(client, bucket, "in/motorcycle.png", photo_bytes["motorcycle_left"])
    requests: list[dict[str, Any]] = [
        {
            "input": astronaut,
            "effect": "remove",
            "format": "png",
            "mask_output": f"s3://{bucket}/masks/a.png",
        },
        {"input": astronaut, "effect": "remove", "background": "transparent", "format": "webp"},
        {"input": chelsea, "effect": "replace", "background": moto, "format": "jpeg"},
        {"input": coffee, "effect": "blur", "blur_strength": 0.3, "format": "webp"},
        {
            "input": moto,
            "effect": "desaturate",
            "format": "jpeg",
            "classes": ["motorbike", "person"],
            # The test model's map need not find these classes: the effect is what is tested.
            "fail_on_no_subject": False,
        },
        {
            "input": chelsea,
            "effect": "remove",
            "background": "#00FF00",
            "format": "png",
            "mask_output": f"s3://{bucket}/masks/c.png",
        },
    ]
    records = client.submit_many(requests)
    finished = client.wait([r["id"] for r in records], timeout=300)

    sizes = {
        location: Image.open(io.BytesIO(photo_bytes[name])).size
        for location, name in (
            (astronaut, "astronaut"),
            (chelsea, "chelsea"),
            (coffee, "coffee"),
            (moto, "motorcycle_left"),
        )
    }
    for request, record in zip(requests, finished, strict=True):
        assert record["status"] == "succeeded", record
        assert _decoded_size(client, record["output"]) == sizes[request["input"]]
        assert record["input_size"] == list(sizes[request["input"]])
        assert record["model"]["name"] == "deeplabv3_mobilenet_v3_large"
        assert record["model"]["weights"]
        assert {"download", "decode", "segment", "refine", "composite", "encode", "upload"} <= set(
            record["timings_ms"]
        )
        assert 0.0 <= record["foreground_fraction"] <= 1.0
        assert record["attempts"] == 1 and record["worker"] and record["error"] is None
    assert _decoded_size(client, f"s3://{bucket}/masks/a.png") == (512, 512)
    transparent = Image.open(io.BytesIO(client.storage.read(finished[1]["output"])))
    assert transparent.mode == "RGBA"


def test_a_missing_input_fails_with_input_not_found_while_its_neighbours_succeed(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    bucket = pipeline_env["BUCKET"]
    present = _upload(client, bucket, "in/present.png", photo_bytes["chelsea"])
    records = client.submit_many(
        [
            {"input": present},
            {"input": f"s3://{bucket}/in/absent.png"},
            {"input": present, "effect": "blur"},
        ]
    )
    first, missing, third = client.wait([r["id"] for r in records], timeout=300)
    assert first["status"] == third["status"] == "succeeded"
    assert missing["status"] == "failed"
    assert missing["error"]["code"] == "input_not_found"
    assert "absent.png" in missing["error"]["message"]


def test_resubmitting_an_idempotency_key_returns_the_same_job(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    location = _upload(client, pipeline_env["BUCKET"], "in/idem.png", photo_bytes["coffee"])
    key = f"upload-{uuid.uuid4()}"
    first = client.submit(input=location, idempotency_key=key)
    second = client.submit(input=location, idempotency_key=key, effect="blur")
    assert second["id"] == first["id"] and second["effect"] == "remove"
    (done,) = client.wait([first["id"]], timeout=300)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_a_retried_failed_job_can_succeed(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    bucket = pipeline_env["BUCKET"]
    location = f"s3://{bucket}/in/late-{uuid.uuid4().hex}.png"
    record = client.submit(input=location)
    (failed,) = client.wait([record["id"]], timeout=300)
    assert failed["error"]["code"] == "input_not_found"
    client.storage.write(location, photo_bytes["astronaut"], content_type="image/png")
    assert client.retry(record["id"])["status"] == "queued"
    (done,) = client.wait([record["id"]], timeout=300)
    assert done["status"] == "succeeded" and done["error"] is None


def test_a_canceled_job_never_runs_even_when_its_message_arrives(
    client: Client,
    settings: Settings,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    location = _upload(client, pipeline_env["BUCKET"], "in/cancel.png", photo_bytes["chelsea"])
    with session_scope(settings.database_url) as session:
        (created,) = jobs.create(session, [JobRequest(input=location)], settings.output_prefix)
    assert client.cancel(created.job.id)["status"] == "canceled"
    broker.enqueue(client.celery, [(created.job.id, "interactive")])
    follower = client.submit(input=location)
    client.wait([follower["id"]], timeout=300)
    poll_until(
        lambda: created.job.id in worker_process.read_text(),
        timeout=60,
        what="the canceled job's message",
    )
    record = client.get(created.job.id)
    assert record["status"] == "canceled" and record["attempts"] == 0
    assert not client.storage.exists(record["output"])


def test_the_cli_uploads_a_local_file_submits_and_waits_for_the_record(
    pipeline_env: dict[str, str], worker_process: Path, photo_paths: dict[str, Path]
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "submit",
            str(photo_paths["coffee"]),
            "--effect",
            "desaturate",
            "--wait",
            "--json",
        ],
        env={**os.environ, **pipeline_env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "succeeded"
    assert record["input"].startswith(f"s3://{pipeline_env['BUCKET']}/in/")
    assert record["input_size"] == [600, 400]


def test_jobs_submitted_together_are_segmented_in_batches(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    location = _upload(client, pipeline_env["BUCKET"], "in/batch.png", photo_bytes["astronaut"])
    records = client.submit_many([{"input": location, "effect": "blur"} for _ in range(12)])
    client.wait([r["id"] for r in records], timeout=300)
    sizes = [
        int(line.rsplit(" ", 1)[-1])
        for line in worker_process.read_text().splitlines()
        if "segmenting a batch of" in line
    ]
    assert max(sizes) > 1


@pytest.fixture(scope="module")
def class_coverage(mobilenet_weights: Path, photo_paths: dict[str, Path]) -> dict[str, float]:
    """Share of the astronaut photo each VOC class covers under the test weights, computed
    in-process by the worker's own segmenter at the worker's settings."""
    import numpy as np

    from producer.request import FOREGROUND_CLASSES, VOC_CLASSES
    from worker.segmenter import Segmenter

    segmenter = Segmenter.load(
        "deeplabv3_mobilenet_v3_large", weights=str(mobilenet_weights), device="cpu", input_size=256
    )
    rgb = np.asarray(Image.open(photo_paths["astronaut"]).convert("RGB"))
    return {
        name: float((segmenter.predict([rgb], [[VOC_CLASSES.index(name)]])[0] > 0.5).mean())
        for name in FOREGROUND_CLASSES
    }


def _present_and_absent(coverage: dict[str, float]) -> tuple[str, str]:
    present = max(coverage, key=coverage.__getitem__)
    absent = next(name for name, share in coverage.items() if share == 0.0)
    assert coverage[present] > 0.2, coverage
    return present, absent


def _pixels(client: Client, location: str) -> Any:
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(client.storage.read(location))))


def test_refinement_runs_and_the_saved_mask_is_the_alpha_of_the_cut_out(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    bucket = pipeline_env["BUCKET"]
    location = _upload(client, bucket, "in/refined.png", photo_bytes["astronaut"])
    record = client.submit(
        input=location,
        background="transparent",
        mask_output=f"s3://{bucket}/masks/refined-{uuid.uuid4().hex}.png",
    )
    (done,) = client.wait([record["id"]], timeout=300)
    assert done["status"] == "succeeded", done
    mask = _pixels(client, done["mask_output"])
    cut_out = _pixels(client, done["output"])
    # A mask that varies with the photo, with a soft edge only a refinement solve produces.
    assert 0.05 < (mask > 127).mean() < 0.95
    soft = (mask > 0) & (mask < 255)
    assert 0 < soft.mean() < 0.2
    assert (cut_out[:, :, 3] == mask).all()


def test_the_selected_classes_change_the_mask(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
    class_coverage: dict[str, float],
) -> None:
    bucket = pipeline_env["BUCKET"]
    present, absent = _present_and_absent(class_coverage)
    location = _upload(client, bucket, "in/classes.png", photo_bytes["astronaut"])
    records = client.submit_many(
        [
            {
                "input": location,
                "classes": [name],
                "mask_output": f"s3://{bucket}/masks/classes-{name}-{uuid.uuid4().hex}.png",
                # The blank mask of the absent class is what this test looks at.
                "fail_on_no_subject": False,
            }
            for name in (present, absent)
        ]
    )
    with_subject, without = client.wait([r["id"] for r in records], timeout=300)
    assert with_subject["status"] == without["status"] == "succeeded"
    assert (_pixels(client, with_subject["mask_output"]) > 127).mean() > 0.2
    assert (_pixels(client, without["mask_output"]) > 127).mean() < 0.001
    assert with_subject["foreground_fraction"] > 0.2 > without["foreground_fraction"]


def test_a_photo_without_the_selected_classes_ends_no_subject_by_default(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
    class_coverage: dict[str, float],
) -> None:
    present, absent = _present_and_absent(class_coverage)
    location = _upload(client, pipeline_env["BUCKET"], "in/nosubj.png", photo_bytes["astronaut"])
    records = client.submit_many(
        [
            {"input": location, "classes": [absent]},
            {"input": location, "classes": [present]},
        ]
    )
    refused, kept = client.wait([r["id"] for r in records], timeout=300)
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "no_subject"
    assert absent in refused["error"]["message"]
    assert not client.storage.exists(refused["output"])
    assert kept["status"] == "succeeded"


def test_a_missing_or_broken_mask_fails_naming_the_mask(
    client: Client,
    pipeline_env: dict[str, str],
    worker_process: Path,
    photo_bytes: dict[str, bytes],
) -> None:
    bucket = pipeline_env["BUCKET"]
    photo = _upload(client, bucket, "in/masked.png", photo_bytes["chelsea"])
    broken = _upload(client, bucket, "in/broken-mask.png", b"not an image")
    records = client.submit_many(
        [
            {"input": photo, "mask": f"s3://{bucket}/in/absent-mask.png"},
            {"input": photo, "mask": broken},
        ]
    )
    missing, unreadable = client.wait([r["id"] for r in records], timeout=300)
    assert missing["error"]["code"] == "input_not_found"
    assert missing["error"]["message"].startswith("mask: ")
    assert unreadable["error"]["code"] == "invalid_image"
    assert unreadable["error"]["message"].startswith("mask image: ")
