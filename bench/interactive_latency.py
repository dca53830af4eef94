"""Backfill submission rate, and interactive-job latency with and without a backfill running.

Needs PostgreSQL (127.0.0.1:5432, user postgres), Redis (127.0.0.1:6379) and the worker extra
(torch): it starts a moto S3 server and a real `backdrop worker` (random-init DeepLabV3-
MobileNetV3 at 256 px, CPU), in a fresh database it drops at the end.

    .venv/bin/python bench/interactive_latency.py [--objects 5000] [--photos 300] [--probes 20]

Figures:
- submission rate: a backfill over `--objects` keys (listing → fingerprints → skip query →
  job insert → cursor, then publish), timed until the last job is queued; once with
  backpressure off (max_in_flight above the total) and once at max_in_flight=1000 with a
  fake completer (so the limit, not the completer, paces it: that is the cost of the waits).
- interactive latency: submit→finish (finished_at − created_at) of interactive jobs sent
  one a second, first on an idle worker, then while a backfill of `--photos` photos runs.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import redis
from PIL import Image
from sqlalchemy import select, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.backfills import submitted
from bench.support.figures import summary
from producer import jobs
from producer.backfill import BackfillRunner
from producer.client import Client
from producer.db import session_scope
from producer.models import Job
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.postgres import fresh_database
from tests.support.services import S3_TEST_CREDENTIALS, MotoServer, WorkerProcess
from tests.support.weights import save_varying_mobilenet

REDIS_URL = "redis://127.0.0.1:6379/13"


def png(seed: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 40 + seed % 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def upload(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()
            )
        )


def submission_rate(engine: BackfillRunner, source: str, out: str, total: int, limit: int) -> float:
    created = engine.create(source, out, {}, limit)
    started = time.perf_counter()
    runner = engine.start_in_thread(created["id"])
    stop = threading.Event()
    completer = threading.Thread(target=complete_jobs, args=(engine.settings, out, stop))
    completer.start()
    poll_until(
        lambda: submitted(engine.settings, created["id"]) >= total, timeout=600, what="submission"
    )
    elapsed = time.perf_counter() - started
    engine.cancel(created["id"])
    stop.set()
    runner.join()
    completer.join()
    return total / elapsed


def complete_jobs(settings: Settings, prefix: str, stop: threading.Event) -> None:
    """A fake worker for the rate run: marks the backfill's queued jobs succeeded in bulk."""
    while not stop.wait(0.02):
        with session_scope(settings.database_url) as session:
            session.execute(
                update(Job)
                .where(Job.status == "queued", Job.output.startswith(prefix + "/"))
                .values(status="succeeded", finished_at=jobs.now())
            )


def latency_probes(client: Client, location: str, count: int) -> list[float]:
    """Submit one interactive job a second; return each one's submit→finish seconds."""
    ids = []
    for _ in range(count):
        ids.append(client.submit(input=location, effect="blur", fail_on_no_subject=False)["id"])
        time.sleep(1.0)  # the probe's pacing, not synchronisation
    records = client.wait(ids, timeout=900)
    with session_scope(client.settings.database_url) as session:
        rows = session.execute(
            select(Job.created_at, Job.finished_at).where(Job.id.in_([r["id"] for r in records]))
        ).all()
    return [(finished - created).total_seconds() for created, finished in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--photo-size", type=int, default=256)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--skip-rate", action="store_true", help="only the latency runs")
    args = parser.parse_args()
    os.environ.update(S3_TEST_CREDENTIALS)
    work = Path(tempfile.mkdtemp(prefix="backdrop-bench-"))
    worker = None
    with fresh_database("backdrop_bench") as url, MotoServer() as moto:
        endpoint = moto.endpoint
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            bucket = "bench"
            s3.create_bucket(Bucket=bucket)
            redis.Redis.from_url(REDIS_URL).flushdb()
            env = {
                "BACKDROP_DATABASE_URL": url,
                "BACKDROP_BROKER_URL": REDIS_URL,
                "BACKDROP_S3_ENDPOINT_URL": endpoint,
                "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/interactive-out",
                "BACKDROP_DATA_DIR": str(work / "data"),
                "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
                # Lively weights: masks vary with the photo, so refinement does its full work.
                "BACKDROP_WEIGHTS": str(save_varying_mobilenet(work / "mobilenet-random.pth")),
                "BACKDROP_MODEL_INPUT_SIZE": "256",
                "BACKDROP_DEVICE": "cpu",
            }
            settings = Settings(**{k.removeprefix("BACKDROP_").lower(): v for k, v in env.items()})
            engine = BackfillRunner(Services(settings))

            print(f"uploading {args.objects} keys and {args.photos} photos …", flush=True)
            tiny = png(0, 8)
            upload(endpoint, bucket, {f"many/{i:05d}.png": tiny for i in range(args.objects)})
            upload(
                endpoint,
                bucket,
                {f"photos/{i:04d}.png": png(i, args.photo_size) for i in range(args.photos)},
            )
            rate_runs = (
                ()
                if args.skip_rate
                else (
                    ("backpressure off", args.objects * 10),
                    ("max_in_flight=1000", 1000),
                )
            )
            for label, limit in rate_runs:
                rate = submission_rate(
                    engine,
                    f"s3://{bucket}/many/",
                    f"s3://{bucket}/rate-{limit}",
                    args.objects,
                    limit,
                )
                print(
                    f"submission rate, {args.objects} objects, {label}: {rate:.0f} jobs/s",
                    flush=True,
                )

            # The rate runs were canceled with their messages still in `bulk`: drop them, or the
            # worker spends the latency run discarding thousands of canceled jobs' messages.
            redis.Redis.from_url(REDIS_URL).delete("bulk", "interactive")
            worker = WorkerProcess(env, work / "worker.log", concurrency=None)
            worker.start().wait_ready(timeout=180)
            client = Client(Services(settings))
            probe = f"s3://{bucket}/probe.png"
            s3.put_object(Bucket=bucket, Key="probe.png", Body=png(1, args.photo_size))
            warm_up = client.submit(input=probe, fail_on_no_subject=False)
            client.wait([warm_up["id"]], timeout=300)
            idle = latency_probes(client, probe, args.probes)
            print(f"interactive latency, idle worker: {summary(idle)}", flush=True)

            created = engine.create(
                f"s3://{bucket}/photos/",
                f"s3://{bucket}/backfill-out",
                {"effect": "blur", "fail_on_no_subject": False},
            )
            started = time.perf_counter()
            runner = engine.start_in_thread(created["id"])
            poll_until(
                lambda: submitted(settings, created["id"]) > 0, timeout=60, what="backfill start"
            )
            busy = latency_probes(client, probe, args.probes)
            in_flight = engine.get(created["id"])["counts"]["in_flight"]
            print(
                f"interactive latency, during a {args.photos}-photo backfill: {summary(busy)}",
                flush=True,
            )
            print(f"  backfill jobs still in flight after the probes: {in_flight}", flush=True)
            runner.join()
            record = engine.get(created["id"])
            elapsed = time.perf_counter() - started
            done = record["counts"]["succeeded"]
            print(
                f"backfill {record['status']}: {done} photos in {elapsed:.1f} s "
                f"({done / elapsed:.1f} photos/s on this CPU worker)",
                flush=True,
            )
        finally:
            if worker is not None:
                worker.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
