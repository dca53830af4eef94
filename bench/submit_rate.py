"""Bulk submission rate: jobs/s through a real `backdrop api` process, through
`Client.submit_many`, and through a backfill's creation of its jobs.

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379, database 12 is
this script's own and is emptied). Creates a fresh database it drops at the end, starts a moto
S3 server (one backfill lists its keys, the other local files) and `backdrop api` (uvicorn on
a loopback socket) as a subprocess. No worker: messages are counted, then deleted.

    .venv/bin/python bench/submit_rate.py [--jobs 10000] [--per-post 1000] [--repeat 3]

Each figure is jobs / wall seconds from the first request to the last answer (API, Client)
or from the backfill's start until its last chunk is recorded and published (backpressure
off: max_in_flight above the total). Each run is checked: as many new rows in the database
and as many messages in Redis as jobs submitted, or the script fails instead of printing.
--repeat runs each measurement that many times; the line shows the best and every run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import boto3
import httpx
import redis
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.backfill import BackfillRunner
from producer.client import Client
from producer.db import session_scope
from producer.models import Backfill, Job
from producer.services import Services
from producer.settings import Settings
from tests.support.network import free_port
from tests.support.polling import poll_until
from tests.support.postgres import fresh_database
from tests.support.services import S3_TEST_CREDENTIALS, MotoServer

REDIS_URL = "redis://127.0.0.1:6379/12"
BUCKET = "submit-bench"
QUEUES = ("interactive", "bulk")


def requests_for(count: int, tag: str) -> list[dict[str, object]]:
    """Distinct outputs (the default naming would do too, but a body with outputs is what a
    bulk producer sends), half of them with idempotency keys, all to the bulk queue."""
    return [
        {
            "input": f"s3://{BUCKET}/photos/{tag}/{i:06d}.jpg",
            "output": f"s3://{BUCKET}/out/{tag}/{i:06d}.png",
            "effect": "remove",
            "queue": "bulk",
            **({"idempotency_key": f"{tag}-{i}"} if i % 2 else {}),
        }
        for i in range(count)
    ]


class Counts:
    """Rows in the database and messages in Redis, to check each run submitted what it says."""

    def __init__(self, database_url: str, queues: redis.Redis) -> None:
        self.database_url = database_url
        self.queues = queues

    def rows(self) -> int:
        with session_scope(self.database_url) as session:
            return session.scalar(select(func.count()).select_from(Job)) or 0

    def messages(self) -> int:
        return sum(self.queues.llen(queue) for queue in QUEUES)

    @contextmanager
    def expect(self, added: int, label: str) -> Iterator[None]:
        rows, messages = self.rows(), self.messages()
        yield
        new_rows, new_messages = self.rows() - rows, self.messages() - messages
        if (new_rows, new_messages) != (added, added):
            raise AssertionError(
                f"{label}: {new_rows} rows and {new_messages} messages for {added} jobs"
            )
        self.queues.delete(*QUEUES)


def api_rate(base: str, token: str, count: int, per_post: int, tag: str) -> float:
    requests = requests_for(count, tag)
    bodies = [requests[i : i + per_post] for i in range(0, count, per_post)]
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        started = time.perf_counter()
        accepted = 0
        for body in bodies:
            response = http.post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise AssertionError(f"POST /v1/jobs: {response.status_code} {response.text}")
            accepted += len(response.json())
        elapsed = time.perf_counter() - started
    if accepted != count:
        raise AssertionError(f"{accepted} records returned for {count} jobs")
    return count / elapsed


def client_rate(client: Client, count: int, per_call: int, tag: str) -> float:
    requests = requests_for(count, tag)
    started = time.perf_counter()
    returned = 0
    for start_at in range(0, count, per_call):
        returned += len(client.submit_many(requests[start_at : start_at + per_call]))
    elapsed = time.perf_counter() - started
    if returned != count:
        raise AssertionError(f"{returned} records returned for {count} jobs")
    return count / elapsed


def backfill_rate(
    engine: BackfillRunner, source: str, output_prefix: str, count: int, counts: Counts
) -> float:
    record = engine.create(source, output_prefix, {}, count * 10)
    messages = counts.messages()
    started = time.perf_counter()
    runner = engine.start_in_thread(record["id"])

    def queued() -> bool:
        # Recorded (jobs and cursor committed) and published (messages follow each commit).
        with session_scope(engine.settings.database_url) as session:
            backfill = session.get(Backfill, record["id"])
            recorded = backfill is not None and backfill.submitted >= count
        return recorded and counts.messages() - messages >= count

    poll_until(queued, timeout=600, what="the backfill's jobs and messages")
    elapsed = time.perf_counter() - started
    engine.cancel(record["id"])
    runner.join()
    return count / elapsed


def write_files(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:06d}.png").write_bytes(b"x")


def upload_keys(endpoint: str, count: int) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket=BUCKET, Key=f"many/{i:06d}.png", Body=b"x"),
                range(count),
            )
        )


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    port = free_port()
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        poll_until(
            lambda: server.poll() is not None or _answers(base + "/healthz"), timeout=60, what="api"
        )
        if server.poll() is not None:
            raise RuntimeError(f"backdrop api exited:\n{log_path.read_text()[-2000:]}")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def show(label: str, rates: list[float]) -> None:
    each = ", ".join(f"{rate:,.0f}" for rate in rates)
    print(f"{label:<44} best {max(rates):>7,.0f} jobs/s   (runs: {each})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--per-post", type=int, default=1000, help="jobs per POST / submit_many")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-backfill", action="store_true")
    args = parser.parse_args()
    os.environ.update(S3_TEST_CREDENTIALS)
    queues = redis.Redis.from_url(REDIS_URL)
    queues.flushdb()
    token = secrets.token_urlsafe(32)
    with (
        tempfile.TemporaryDirectory(prefix="backdrop-submit-") as work,
        fresh_database("backdrop_submit") as url,
        MotoServer() as moto,
    ):
        env = {
            "BACKDROP_DATABASE_URL": url,
            "BACKDROP_BROKER_URL": REDIS_URL,
            "BACKDROP_S3_ENDPOINT_URL": moto.endpoint,
            "BACKDROP_OUTPUT_PREFIX": f"s3://{BUCKET}/default-out",
            "BACKDROP_DATA_DIR": str(Path(work) / "data"),
            "BACKDROP_API_TOKENS": token,
            "BACKDROP_LOCAL_ROOTS": work,
        }
        settings = Settings(**{k.removeprefix("BACKDROP_").lower(): v for k, v in env.items()})
        counts = Counts(url, queues)
        print(f"{args.jobs} jobs per run, {args.per_post} per POST / submit_many call", flush=True)
        with api_server(env, Path(work) / "api.log") as base:
            rates = []
            for run in range(args.repeat):
                with counts.expect(args.jobs, "API"):
                    rates.append(api_rate(base, token, args.jobs, args.per_post, f"api{run}"))
            show("POST /v1/jobs, backdrop api over HTTP:", rates)
        client = Client(Services(settings))
        rates = []
        for run in range(args.repeat):
            with counts.expect(args.jobs, "Client"):
                rates.append(client_rate(client, args.jobs, args.per_post, f"client{run}"))
        show("Client.submit_many:", rates)
        if args.skip_backfill:
            return
        engine = BackfillRunner(Services(settings))
        photos = Path(work) / "photos"
        write_files(photos, args.jobs)
        rates = []
        for run in range(args.repeat):
            with counts.expect(args.jobs, "backfill (files)"):
                out = (Path(work) / f"backfill-out-{run}").as_uri()
                rates.append(backfill_rate(engine, photos.as_uri(), out, args.jobs, counts))
        show(f"backfill over {args.jobs} local files:", rates)
        upload_keys(moto.endpoint, args.jobs)
        rates = []
        for run in range(args.repeat):
            with counts.expect(args.jobs, "backfill (S3)"):
                out = f"s3://{BUCKET}/backfill-out/{run}"
                rates.append(backfill_rate(engine, f"s3://{BUCKET}/many/", out, args.jobs, counts))
        show(f"backfill over {args.jobs} S3 keys (moto):", rates)
    queues.flushdb()


if __name__ == "__main__":
    main()
