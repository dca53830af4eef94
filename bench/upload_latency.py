"""Upload-and-wait latency: POST /v1/process at 2 MP, on an idle worker and during a backfill.

Needs PostgreSQL (127.0.0.1:5432, user postgres), Redis (127.0.0.1:6379) and the worker extra
(torch): it starts a moto S3 server, a real `backdrop worker` (random-init DeepLabV3-
MobileNetV3 at 256 px, CPU) and the API under uvicorn, in a fresh database it drops at the end.

    .venv/bin/python bench/upload_latency.py [--probes 20] [--photos 300] [--megapixels 2]

Each probe is one request from the client's side, upload to last byte of the answer: the
multipart upload, storing it, the job's queueing and processing, the API noticing the final
state (it polls the status with backoff), and streaming the image back. Probes run one after
another: first on an idle worker, then while a backfill of `--photos` photos of the same size
runs on the bulk queue (interactive jobs are taken first); "still in flight" afterwards says
whether the backfill outlasted the probes (it should: else raise --photos).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import httpx
import numpy as np
import redis
import uvicorn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.backfills import submitted
from bench.support.figures import summary
from producer.api import create_app
from producer.backfill import BackfillRunner
from producer.services import Services
from producer.settings import Settings
from tests.support.network import free_port
from tests.support.polling import poll_until
from tests.support.postgres import fresh_database
from tests.support.services import S3_TEST_CREDENTIALS, MotoServer, WorkerProcess
from tests.support.weights import save_varying_mobilenet

# Its own DB: each bench flushes or empties the queues of its own.
REDIS_URL = "redis://127.0.0.1:6379/11"
TOKEN = "bench-upload-token-0123456789abcdef"


def photo(seed: int, megapixels: float) -> bytes:
    """A 4:3 JPEG of about `megapixels`: smooth shapes plus noise, as a camera's would be."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = rng.uniform(0.3, 0.7, 2) * (width, height)
    disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) < (0.25 * height) ** 2
    image = np.stack([x / width * 200, y / height * 200, np.full_like(x, 90)], axis=-1)
    image[disc] = (30, 140, 220)
    image += rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def probes(base: str, image: bytes, count: int) -> list[float]:
    seconds = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.post(
                "/v1/process",
                files={"image": ("photo.jpg", image, "image/jpeg")},
                data={"effect": "blur", "fail_on_no_subject": "false", "timeout": "300"},
            )
            seconds.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"/v1/process answered {response.status_code}: {response.text}")
    return seconds


def serve(settings: Settings, port: int) -> uvicorn.Server:
    app = create_app(Services(settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    poll_until(lambda: server.started, timeout=30, what="the API")
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--megapixels", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.update(S3_TEST_CREDENTIALS)
    work = Path(tempfile.mkdtemp(prefix="backdrop-bench-"))
    worker = server = None
    with fresh_database("backdrop_bench") as url, MotoServer() as moto:
        endpoint = moto.endpoint
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            bucket = "bench"
            s3.create_bucket(Bucket=bucket)
            redis.Redis.from_url(REDIS_URL).delete("bulk", "interactive")
            env = {
                "BACKDROP_DATABASE_URL": url,
                "BACKDROP_BROKER_URL": REDIS_URL,
                "BACKDROP_S3_ENDPOINT_URL": endpoint,
                "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
                "BACKDROP_INPUT_PREFIX": f"s3://{bucket}/in",
                "BACKDROP_DATA_DIR": str(work / "data"),
                "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
                # Lively weights: masks vary with the photo, so refinement does its full work.
                "BACKDROP_WEIGHTS": str(save_varying_mobilenet(work / "mobilenet-random.pth")),
                "BACKDROP_MODEL_INPUT_SIZE": "256",
                "BACKDROP_DEVICE": "cpu",
                "BACKDROP_API_TOKENS": TOKEN,
            }
            settings = Settings(**{k.removeprefix("BACKDROP_").lower(): v for k, v in env.items()})
            image = photo(0, args.megapixels)
            print(f"probe photo: {args.megapixels} MP JPEG, {len(image)} bytes", flush=True)
            for i in range(args.photos):
                s3.put_object(Bucket=bucket, Key=f"photos/{i:04d}.jpg", Body=photo(i + 1, 2.0))
            worker = WorkerProcess(env, work / "worker.log", concurrency=None)
            worker.start().wait_ready(timeout=180)
            api_port = free_port()
            server = serve(settings, api_port)
            base = f"http://127.0.0.1:{api_port}"
            probes(base, image, 2)  # warm-up: model load, first connections
            idle = probes(base, image, args.probes)
            print(f"POST /v1/process, idle worker: {summary(idle)}", flush=True)

            engine = BackfillRunner(Services(settings))
            created = engine.create(
                f"s3://{bucket}/photos/",
                f"s3://{bucket}/backfill-out",
                {"effect": "blur", "fail_on_no_subject": False},
            )
            runner = engine.start_in_thread(created["id"])
            poll_until(
                lambda: submitted(settings, created["id"]) > 0, timeout=60, what="backfill start"
            )
            busy = probes(base, image, args.probes)
            in_flight = engine.get(created["id"])["counts"]["in_flight"]
            print(f"POST /v1/process, during a {args.photos}-photo backfill: {summary(busy)}")
            print(f"  backfill jobs still in flight after the probes: {in_flight}", flush=True)
            if engine.get(created["id"])["status"] == "running":
                engine.cancel(created["id"])
            runner.join()
        finally:
            if server is not None:
                server.should_exit = True
            if worker is not None:
                worker.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
