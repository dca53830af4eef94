"""Throughput, measured side by side in one run:

  (a) model only: Segmenter.predict on decoded photos, per batch size;
  (b) the tutorial's way: one photo at a time in one process: decode, model, threshold,
      7x7 blur, float64 blend at full resolution, encode;
  (c) end to end: jobs submitted through the Python client into Redis, photos in S3 (moto's
      HTTP server on loopback), records in PostgreSQL, processed by a real `backdrop worker`.

Random-init weights unless --weights is given: speed does not depend on their values, as
long as the masks they give vary (see write_random_weights).
Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 for (c).

    .venv/bin/python bench/throughput.py [--model deeplabv3_mobilenet_v3_large] [--photos 24]
        [--max-batch 8] [--rounds 2] [--input-size 520] [--tutorial-size 520]
        [--memory-jobs 0]

The worker's model sees the photo's long side at --input-size; the tutorial's sees its short
side at --tutorial-size. `--input-size 693` gives both the same pixels on these 4:3 photos.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import cv2
import numpy as np
import redis
import skimage.data
import torch
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer import broker
from producer.client import Client
from producer.db import upgrade
from producer.settings import Settings
from producer.storage import Storage
from tests.lively import calibrate_on_noise
from worker.segmenter import Segmenter
from worker.weights import MODELS, NUM_CLASSES, load_model

SIZES = ((1280, 960), (1600, 1200), (2000, 1500))  # 1.2, 1.9 and 3.0 MP
PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left")
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/13"


def make_photos(count: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[bytes]:
    folder = Path(skimage.data.__file__).parent
    sources = [cv2.imread(str(folder / f"{name}.png")) for name in PHOTOS]
    photos = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        big = cv2.resize(sources[i % len(sources)], (width, height), interpolation=cv2.INTER_CUBIC)
        photos.append(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
    return photos


def write_random_weights(model: str, folder: Path) -> Path:
    """Random-init weights whose masks vary across the photo, as real weights' do, so every
    stage (refinement above all) costs what it would with the published weights."""
    torch.manual_seed(0)
    net = calibrate_on_noise(
        MODELS[model].builder(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
        )
    )
    path = folder / f"{model}-random.pth"
    torch.save(net.state_dict(), path)
    return path


def model_only(segmenter: Segmenter, photos: list[bytes], batch: int) -> float:
    images = [
        cv2.cvtColor(cv2.imdecode(np.frombuffer(p, np.uint8), 1), cv2.COLOR_BGR2RGB) for p in photos
    ]
    classes = [list(range(1, 21))] * len(images)
    segmenter.predict(images[:batch], classes[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        segmenter.predict(images[i : i + batch], classes[i : i + batch])
    return len(images) / (time.perf_counter() - started)


def tutorial_loop(model: torch.nn.Module, photos: list[bytes], input_size: int) -> float:
    """The tutorial's pipeline, one photo at a time, producing a full-resolution JPEG."""
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(input_size),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    model.eval()

    def one(data: bytes) -> bytes:
        import io

        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            out = model(transform(image).unsqueeze(0))["out"]
        classes = torch.argmax(out.squeeze(), dim=0).numpy()
        _, alpha = cv2.threshold(classes.astype(np.uint8), 0, 255, cv2.THRESH_BINARY)
        alpha = cv2.GaussianBlur(alpha, (7, 7), 0)
        foreground = np.asarray(image)
        alpha = cv2.resize(alpha, (foreground.shape[1], foreground.shape[0]))
        alpha = np.repeat(alpha[..., None], 3, axis=2).astype(float) / 255
        background = 255 * np.ones_like(foreground).astype(float)
        blended = cv2.add(
            cv2.multiply(alpha, foreground.astype(float)), cv2.multiply(1.0 - alpha, background)
        )
        return cv2.imencode(".jpg", blended.astype(np.uint8)[..., ::-1])[1].tobytes()

    one(photos[0])  # warm-up
    started = time.perf_counter()
    for data in photos:
        one(data)
    return len(photos) / (time.perf_counter() - started)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes have used so far (threads included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone: a PostgreSQL backend that closed
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


class Services:
    """A fresh PostgreSQL database, a Redis DB, moto's S3 server, and a real worker."""

    def __init__(self, weights: Path, model: str, input_size: int, folder: Path) -> None:
        self.db_name = f"backdrop_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        redis.Redis.from_url(REDIS_URL).flushdb()
        port = free_port()
        self.s3 = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
        )
        s3 = boto3.client("s3", endpoint_url=endpoint)
        wait_for(lambda: _answers(s3), 30, "the S3 server")
        s3.create_bucket(Bucket="bench")
        self.env = {
            "BACKDROP_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}",
            "BACKDROP_BROKER_URL": REDIS_URL,
            "BACKDROP_S3_ENDPOINT_URL": endpoint,
            "BACKDROP_OUTPUT_PREFIX": "s3://bench/out",
            "BACKDROP_ALLOWED_BUCKETS": "bench",
            "BACKDROP_MODEL": model,
            "BACKDROP_WEIGHTS": str(weights),
            "BACKDROP_MODEL_INPUT_SIZE": str(input_size),
            "BACKDROP_DEVICE": "auto",
            "BACKDROP_DATA_DIR": str(folder),
        }
        self.settings = Settings(
            **{k.removeprefix("BACKDROP_").lower(): v for k, v in self.env.items()}
        )
        upgrade(self.settings.database_url)
        self.client = Client(
            self.settings, storage=Storage(self.settings), celery=broker.make_celery(self.settings)
        )
        self.folder = folder
        self.worker: subprocess.Popen[bytes] | None = None

    def start_worker(self, max_batch: int) -> None:
        self.log = self.folder / f"worker-batch-{max_batch}.log"
        with self.log.open("w") as log_file:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "worker"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "BACKDROP_MAX_BATCH": str(max_batch)},
            )
        worker = self.worker
        wait_for(
            lambda: " ready." in self.log.read_text() or worker.poll() is not None,
            120,
            "the worker",
        )
        if worker.poll() is not None:
            raise SystemExit(self.log.read_text()[-3000:])

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.worker.kill()
        self.worker = None

    def batch_sizes(self) -> list[int]:
        """The size of every model batch the current worker has logged."""
        return [
            int(line.rsplit(" ", 1)[-1])
            for line in self.log.read_text().splitlines()
            if "segmenting a batch of" in line
        ]

    def upload(self, photos: list[bytes]) -> list[str]:
        locations = []
        for i, data in enumerate(photos):
            location = f"s3://bench/in/{uuid.uuid4().hex}-{i}.jpg"
            self.client.storage.write(location, data, content_type="image/jpeg")
            locations.append(location)
        return locations

    def run(self, locations: list[str]) -> tuple[float, list[dict]]:
        started = time.perf_counter()
        records = self.client.submit_many([{"input": loc, "format": "jpeg"} for loc in locations])
        finished = self.client.wait([r["id"] for r in records], timeout=3600)
        return len(locations) / (time.perf_counter() - started), finished

    def processes(self) -> dict[str, list[int]]:
        """Where the CPU goes during (c), by process (PostgreSQL: every backend)."""
        assert self.worker is not None
        return {
            "worker": [self.worker.pid],
            "S3 server": [self.s3.pid],
            "PostgreSQL": pids_named("postgres"),
            "Redis": pids_named("redis-server"),
            "producer (submit + wait)": [os.getpid()],
        }

    def worker_rss_mb(self) -> float:
        assert self.worker is not None
        for line in Path(f"/proc/{self.worker.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.stop_worker()
        self.s3.terminate()
        from producer.db import get_engine

        get_engine(self.settings.database_url).dispose()
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))


def _answers(s3) -> bool:  # type: ignore[no-untyped-def]
    try:
        s3.list_buckets()
        return True
    except Exception:
        return False


@dataclass
class EndToEnd:
    """(c) at one max batch size, over several rounds."""

    max_batch: int
    rates: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return float(np.mean(self.rates))

    def measure(self, services: Services, photos: list[bytes]) -> None:
        locations = services.upload(photos)
        processes = services.processes()
        before = {name: cpu_seconds(pids) for name, pids in processes.items()}
        rate, self.records = services.run(locations)
        self.rates.append(rate)
        self.cpu_ms = {
            name: (cpu_seconds(pids) - before[name]) / len(photos) * 1000
            for name, pids in processes.items()
        }


def measure_end_to_end(
    services: Services, photos: list[bytes], batches: list[int], rounds: int, tutorial
) -> tuple[dict[int, EndToEnd], list[float]]:  # type: ignore[no-untyped-def]
    """Per max batch size: a fresh worker, warmed up, then rounds of (b) and (c) in turn, so
    both see the same machine (a noisy neighbour slows both, not one)."""
    results, tutorial_rates = {}, []
    for batch in batches:
        services.start_worker(batch)
        try:
            services.run(services.upload(photos[:4]))  # warm-up: model load, first shapes
            skip = len(services.batch_sizes())
            result = EndToEnd(batch)
            for _ in range(rounds):
                tutorial_rates.append(tutorial())
                result.measure(services, photos)
            result.batch_sizes = services.batch_sizes()[skip:]
            results[batch] = result
        finally:
            services.stop_worker()
    return results, tutorial_rates


def measure_memory(services: Services, jobs: int, max_batch: int) -> dict[str, float]:
    """Worker RSS, peak and at the end, over the first 200 jobs and over the last 200 of
    `jobs` (small photos, so it runs in minutes). Peaks, sampled 5 times a second, are what
    an out-of-memory killer sees."""
    services.start_worker(max_batch)
    try:
        locations = services.upload(make_photos(8, ((640, 480),)))

        def run(count: int) -> float:
            return peak_rss_mb(
                services, lambda: services.run([locations[i % 8] for i in range(count)])
            )

        figures = {"first 200 peak": run(200), "first 200 end": services.worker_rss_mb()}
        run(jobs - 400)
        figures["last 200 peak"] = run(200)
        figures["last 200 end"] = services.worker_rss_mb()
        return figures
    finally:
        services.stop_worker()


def peak_rss_mb(services: Services, work) -> float:  # type: ignore[no-untyped-def]
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, services.worker_rss_mb())
            done.wait(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large", choices=list(MODELS))
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--input-size",
        type=int,
        default=520,
        help="the worker's BACKDROP_MODEL_INPUT_SIZE: the LONG side the model sees",
    )
    parser.add_argument(
        "--tutorial-size",
        type=int,
        default=520,
        help="the tutorial's T.Resize: the SHORT side (693 long on a 4:3 photo at 520)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="(b) and (c) rounds, alternated")
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=0,
        help="also run N jobs and compare worker RSS after 200 and N",
    )
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="backdrop-bench-"))
    weights = args.weights or write_random_weights(args.model, folder)
    photos = make_photos(args.photos)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    segmenter = Segmenter.load(
        args.model, weights=str(weights), device=device, input_size=args.input_size
    )
    print(f"device: {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)")
    print(
        f"model: {args.model}, weights {segmenter.weights_id}; model input: worker long side "
        f"{args.input_size}, tutorial short side {args.tutorial_size}"
    )
    sizes_text = ", ".join(f"{w}x{h}" for w, h in SIZES)
    print(f"photos: {len(photos)} JPEGs at {sizes_text}; max batch {args.max_batch}")
    print(f"(b) and (c) alternate over {args.rounds} rounds; figures are their means")

    batches = sorted({1, args.max_batch})
    model_rates = {b: model_only(segmenter, photos, b) for b in batches}
    del segmenter
    tutorial_model = load_model(args.model, weights)

    services = Services(weights, args.model, args.input_size, folder)
    try:
        e2e, tutorial_rates = measure_end_to_end(
            services,
            photos,
            batches,
            args.rounds,
            lambda: tutorial_loop(tutorial_model, photos, args.tutorial_size),
        )
        memory = (
            measure_memory(services, args.memory_jobs, args.max_batch) if args.memory_jobs else None
        )
    finally:
        services.close()
    report(
        model_rates,
        float(np.mean(tutorial_rates)),
        e2e,
        args.max_batch,
        memory,
        args.memory_jobs,
    )


def report(
    model_rates: dict[int, float],
    tutorial_rate: float,
    e2e: dict[int, EndToEnd],
    max_batch: int,
    memory: dict[str, float] | None,
    memory_jobs: int,
) -> None:
    print()
    print(f"{'pipeline':52} {'images/s':>9}")
    for b, rate in model_rates.items():
        print(f"{'(a) model only, batch ' + str(b):52} {rate:9.2f}")
    print(f"{'(b) tutorial loop, one at a time, in process':52} {tutorial_rate:9.2f}")
    for b, result in e2e.items():
        label = f"(c) end to end, max batch {b}: Redis + S3 + PostgreSQL"
        print(f"{label:52} {result.rate:9.2f}")
    best = e2e[max_batch]
    print()
    print(f"(c)/(b) = {best.rate / tutorial_rate:.2f}x    ", end="")
    print(f"(c)/(a) at batch {max_batch} = {best.rate / model_rates[max_batch]:.2f}x    ", end="")
    print(f"(c) batch {max_batch} / (c) batch 1 = {best.rate / e2e[1].rate:.2f}x")
    for b, result in e2e.items():
        failed = sum(r["status"] != "succeeded" for r in result.records)
        sizes = result.batch_sizes or [0]
        print(
            f"max batch {b}: jobs failed {failed}; model batches {len(sizes)}, "
            f"mean size {np.mean(sizes):.1f}, max {max(sizes)}"
        )
        stages = sorted({st for r in result.records for st in r["timings_ms"] or {}})
        means = {
            st: np.mean([(r["timings_ms"] or {}).get(st, 0.0) for r in result.records])
            for st in stages
        }
        print("  mean stage ms: " + ", ".join(f"{st} {ms:.0f}" for st, ms in means.items()))
        capacity = (os.cpu_count() or 1) / result.rates[-1] * 1000
        print(
            "  CPU ms per job: "
            + ", ".join(f"{name} {ms:.0f}" for name, ms in result.cpu_ms.items())
            + f"; total {sum(result.cpu_ms.values()):.0f} of {capacity:.0f} available"
        )
    if memory:
        print(f"worker RSS over {memory_jobs} jobs, MB: ", end="")
        print(", ".join(f"{name} {mb:.0f}" for name, mb in memory.items()))
        for kind in ("peak", "end"):
            growth = (memory[f"last 200 {kind}"] / memory[f"first 200 {kind}"] - 1) * 100
            print(f"  {kind}: last 200 vs first 200 jobs {growth:+.1f}%")


if __name__ == "__main__":
    main()
