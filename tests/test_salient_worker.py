"""The salient models end to end: a real `backdrop worker` on a stand-in ONNX file of each,
through PostgreSQL, Redis and an HTTP S3 endpoint, every effect on a product photo."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from producer.client import Client
from producer.errors import InvalidRequest
from producer.services import Services
from producer.settings import Settings
from tests.support.salient import save_standin
from tests.support.services import WorkerProcess
from tests.support.session_redis import redis_url_for_tests
from worker.salient import SALIENT_MODELS

pytestmark = pytest.mark.integration

# A red product on a light grey sweep, as a marketplace shoots a bag: no Pascal VOC class.
HEIGHT, WIDTH = 240, 320
TOP, BOTTOM, LEFT, RIGHT = 60, 180, 100, 220


def product_png() -> bytes:
    photo = np.full((HEIGHT, WIDTH, 3), 205, np.uint8)
    photo[TOP:BOTTOM, LEFT:RIGHT] = (200, 25, 35)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    return buffer.getvalue()


def empty_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (205, 205, 205)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=list(SALIENT_MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def env(
    model_name: str,
    postgres_url: str,
    s3_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """What the worker and the producer share: the model is a stand-in of `model_name`'s file."""
    bucket = f"salient-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("salient")
    weights = save_standin(folder / f"standin-{model_name}.onnx", model_name)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {
        "BACKDROP_DATABASE_URL": postgres_url,
        "BACKDROP_BROKER_URL": redis_url_for_tests(),
        "BACKDROP_S3_ENDPOINT_URL": s3_server,
        "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
        "BACKDROP_ALLOWED_BUCKETS": bucket,
        "BACKDROP_DATA_DIR": str(folder / "data"),
        "BACKDROP_MODEL": model_name,
        "BACKDROP_WEIGHTS": str(weights),
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "4",
        "BACKDROP_MAX_WAIT_MS": "50",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "BUCKET": bucket,
    }


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Client:
    fields = {
        key.removeprefix("BACKDROP_").lower(): value
        for key, value in env.items()
        if key.startswith("BACKDROP_")
    }
    return Client(Services(Settings(**fields)))


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log"):
        yield


def upload(client: Client, env: dict[str, str], name: str, data: bytes) -> str:
    location = f"s3://{env['BUCKET']}/in/{name}"
    client.storage.write(location, data, content_type="image/png")
    return location


def decoded(client: Client, location: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.storage.read(location))))


def test_every_effect_cuts_out_a_product_that_no_class_names(
    model_name: str, client: Client, env: dict[str, str], worker: None
) -> None:
    product = upload(client, env, "product.png", product_png())
    backdrop = upload(client, env, "backdrop.png", empty_png())
    bucket = env["BUCKET"]
    requests: list[dict[str, Any]] = [
        {
            "input": product,
            "effect": "remove",
            "background": "transparent",
            "format": "png",
            "mask_output": f"s3://{bucket}/masks/product.png",
        },
        {"input": product, "effect": "replace", "background": backdrop, "format": "png"},
        {"input": product, "effect": "blur", "blur_strength": 0.5, "format": "png"},
        {"input": product, "effect": "desaturate", "format": "png"},
        {"input": product, "effect": "remove", "crop": "subject", "margin": 0, "format": "png"},
    ]
    records = client.wait([r["id"] for r in client.submit_many(requests)], timeout=300)
    for record in records:
        assert record["status"] == "succeeded", record
        assert record["model"]["name"] == model_name
        assert record["model"]["weights"].startswith(f"standin-{model_name}.onnx@sha256:")
        assert 0.15 < record["foreground_fraction"] < 0.25  # the product is 19% of the photo
    cut_out = decoded(client, records[0]["output"])
    assert cut_out.shape == (HEIGHT, WIDTH, 4)
    assert cut_out[HEIGHT // 2, WIDTH // 2, 3] == 255  # the product kept
    assert cut_out[10, 10, 3] == 0  # the backdrop gone
    mask = decoded(client, f"s3://{bucket}/masks/product.png")
    assert mask[HEIGHT // 2, WIDTH // 2] == 255 and mask[10, 10] == 0
    desaturated = decoded(client, records[3]["output"]).astype(int)
    assert desaturated[HEIGHT // 2, WIDTH // 2, 0] - desaturated[HEIGHT // 2, WIDTH // 2, 1] > 100
    cropped = decoded(client, records[4]["output"])
    assert abs(cropped.shape[0] - (BOTTOM - TOP)) <= 6
    assert abs(cropped.shape[1] - (RIGHT - LEFT)) <= 6


def test_a_photo_with_nothing_salient_fails_as_no_subject(
    client: Client, env: dict[str, str], worker: None
) -> None:
    empty = upload(client, env, "empty.png", empty_png())
    (record,) = client.wait([client.submit(input=empty)["id"]], timeout=300)
    assert record["status"] == "failed"
    assert record["error"]["code"] == "no_subject"


def test_classes_are_refused_at_submit_with_the_reason(client: Client, env: dict[str, str]) -> None:
    product = f"s3://{env['BUCKET']}/in/product.png"
    with pytest.raises(InvalidRequest, match="classes apply to the DeepLabV3 models only"):
        client.submit(input=product, classes=["person"])


def test_a_worker_given_a_file_of_another_signature_refuses_to_start_with_the_fix(
    env: dict[str, str], model_name: str, tmp_path: Path
) -> None:
    other = "u2net" if model_name == "isnet-general-use" else "isnet-general-use"
    misfit = save_standin(tmp_path / "misfit.onnx", other)
    started = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker"],
        env={**WorkerProcess(env, tmp_path / "log").env, "BACKDROP_WEIGHTS": str(misfit)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert f"does not fit {model_name}" in started.stderr
    assert "Fix:" in started.stderr and "BACKDROP_WEIGHTS" in started.stderr
