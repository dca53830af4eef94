"""A whole Backdrop deployment for end-to-end tests: dedicated PostgreSQL and Redis servers,
the S3 test endpoint behind the fault-injecting proxy (every request of the workers goes
through it), real worker processes, and a client.

Tests read outcomes from where they live: the database (job records) and storage (the
objects the proxy saw written, PUT by PUT).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select

from producer import broker
from producer.client import Client
from producer.db import get_engine, session_scope, upgrade
from producer.models import Job, JobStatus
from producer.services import Services
from producer.settings import Settings
from producer.storage import Storage
from tests.support.faulty_s3 import FaultyS3
from tests.support.model_gate import GATE_ENV, ModelGate
from tests.support.polling import poll_until
from tests.support.services import S3_TEST_CREDENTIALS, PostgresServer, RedisServer, WorkerProcess

REPOSITORY = Path(__file__).resolve().parents[1]

# Small settings so that crashes and outages play out in seconds.
LEASE_S = 3
MAX_ATTEMPTS = 3
VISIBILITY_TIMEOUT_S = 5


def small_photo(photo: bytes, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    image = Image.open(io.BytesIO(photo)).convert("RGB").resize(size)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]
    settings: Settings
    client: Client
    storage: Storage  # direct to the S3 endpoint: what the tests upload and inspect
    proxy: FaultyS3
    bucket: str
    redis: RedisServer
    postgres: PostgresServer
    # When set, workers run with a gate inside the model (support.model_gate), open by default.
    gate: ModelGate | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    # --- workers -------------------------------------------------------------------------

    def start_workers(self, count: int, *, concurrency: int = 4, **env: str) -> list[WorkerProcess]:
        module = "tests.support.model_gate" if self.gate else "producer.cli"
        started = []
        for _ in range(count):
            log_path = self.folder / f"worker-{uuid.uuid4().hex[:6]}.log"
            worker = WorkerProcess(
                {**self.env, **env}, log_path, concurrency=concurrency, module=module
            )
            started.append(worker.start())
        with ThreadPoolExecutor(len(started) or 1) as pool:
            list(pool.map(lambda worker: worker.wait_ready(), started))
        self.workers.extend(started)
        return started

    def ensure_workers(self, count: int) -> list[WorkerProcess]:
        """Keep `count` live workers (a test may have killed some)."""
        self.workers = [worker for worker in self.workers if worker.alive]
        if len(self.workers) < count:
            self.start_workers(count - len(self.workers))
        return self.workers

    def worker_named(self, name: str | None) -> WorkerProcess | None:
        return next((w for w in self.workers if w.alive and w.name == name), None)

    def stop_workers(self) -> None:
        """Warm shutdown of every worker (SIGTERM, each waited for)."""
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.folder.glob("*.log"))

    def log_sizes(self) -> dict[Path, int]:
        """A mark in every log, for logs_since."""
        return {path: path.stat().st_size for path in self.folder.glob("*.log")}

    def logs_since(self, sizes: Mapping[Path, int]) -> str:
        """What the logs (workers', Redis's) gained since `sizes` was taken."""
        gained = []
        for path in self.folder.glob("*.log"):
            with path.open("rb") as log_file:
                log_file.seek(sizes.get(path, 0))
                gained.append(log_file.read().decode(errors="replace"))
        return "\n".join(gained)

    # --- inputs and outcomes -------------------------------------------------------------

    def upload(self, key: str, data: bytes) -> str:
        location = f"s3://{self.bucket}/{key}"
        self.storage.write(location, data, content_type="application/octet-stream")
        return location

    def submit(self, requests: Iterable[Mapping[str, Any]]) -> list[str]:
        return [record["id"] for record in self.client.submit_many(list(requests))]

    def records(self, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(job_ids)
        found: dict[str, dict[str, Any]] = {}
        with session_scope(self.settings.database_url) as session:
            for start_at in range(0, len(ids), 1000):
                chunk = ids[start_at : start_at + 1000]
                for job in session.scalars(select(Job).where(Job.id.in_(chunk))):
                    found[job.id] = job.to_record()
        return found

    def all_final(self, job_ids: Iterable[str]) -> bool:
        ids = list(job_ids)
        records = self.records(ids)
        return len(records) == len(ids) and all(
            JobStatus(r["status"]).final for r in records.values()
        )

    def wait_final(self, job_ids: list[str], *, timeout: float) -> dict[str, dict[str, Any]]:
        poll_until(lambda: self.all_final(job_ids), timeout=timeout, what="every job to finish")
        return self.records(job_ids)

    def running_on(self, job_ids: Iterable[str]) -> dict[str, str]:
        """job id → worker name, for the jobs running now."""
        return {
            job_id: record["worker"]
            for job_id, record in self.records(job_ids).items()
            if record["status"] == JobStatus.RUNNING.value
        }

    def key_of(self, location: str) -> str:
        return "/" + location.removeprefix("s3://")

    def writes_of(self, location: str) -> int:
        """How many times the workers wrote this object: PUTs the store acknowledged."""
        key = self.key_of(location)
        return self.proxy.writes(key).get(key, 0)

    def job_of_path(self, records: Mapping[str, Mapping[str, Any]], path: str) -> str:
        """The job whose output is at this proxy path."""
        return next(job_id for job_id, r in records.items() if self.key_of(r["output"]) == path)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.proxy.close()
        get_engine(self.settings.database_url).dispose()
        self.redis.stop()
        self.postgres.remove()


def build_stack(
    folder: Path,
    s3_endpoint: str,
    weights: Path,
    *,
    redis_password: str | None = None,
    db_password: str | None = None,
    model_gate: bool = False,
    **extra_env: str,
) -> Stack:
    """`model_gate`: workers with a gate inside the model (closed by a test to hold a batch
    there); `extra_env`: more worker environment."""
    import boto3

    postgres = PostgresServer()
    redis = RedisServer(folder, password=redis_password)
    proxy = FaultyS3(s3_endpoint)
    try:
        postgres.start()
        redis.start()
        postgres.create_database("backdrop")
        database_url = postgres.url("backdrop", password=db_password)
        upgrade(database_url)
    except BaseException:
        proxy.close()
        redis.stop()
        postgres.remove()
        raise
    bucket = f"stack-{uuid.uuid4().hex[:8]}"
    boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    env = {
        **S3_TEST_CREDENTIALS,
        "BACKDROP_DATABASE_URL": database_url,
        "BACKDROP_BROKER_URL": redis.url,
        "BACKDROP_S3_ENDPOINT_URL": proxy.url,
        "BACKDROP_S3_CONNECT_TIMEOUT_S": "2",
        "BACKDROP_S3_READ_TIMEOUT_S": "60",
        "BACKDROP_S3_MAX_ATTEMPTS": "2",
        "BACKDROP_OUTPUT_PREFIX": f"s3://{bucket}/out",
        "BACKDROP_INPUT_PREFIX": f"s3://{bucket}/in",
        "BACKDROP_ALLOWED_BUCKETS": bucket,
        "BACKDROP_DATA_DIR": str(folder / "data"),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "4",
        "BACKDROP_MAX_WAIT_MS": "20",
        "BACKDROP_JOB_LEASE_S": str(LEASE_S),
        "BACKDROP_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "BACKDROP_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        # One torch thread per worker: several workers share two cores.
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    gate = None
    if model_gate:
        gate = ModelGate(folder / "model-gate")
        env |= {GATE_ENV: str(gate.folder), "PYTHONPATH": str(REPOSITORY)}
    settings = Settings(
        **{
            key.removeprefix("BACKDROP_").lower(): value
            for key, value in env.items()
            if key.startswith("BACKDROP_")
        }
    )
    direct = Settings(**{**settings.model_dump(), "s3_endpoint_url": s3_endpoint})
    storage = Storage(direct)
    client = Client(Services(settings, storage=storage, celery=broker.make_celery(settings)))
    return Stack(
        folder=folder,
        env=env,
        settings=settings,
        client=client,
        storage=storage,
        proxy=proxy,
        bucket=bucket,
        redis=redis,
        postgres=postgres,
        gate=gate,
    )
