"""Throughput, measured side by side in one run, per output format (PNG, the default job's,
and JPEG):

  (a) model only: Segmenter.predict on decoded photos, per batch size (no codecs, no S3).
  (b) two plain loops, one photo at a time in this process, each doing exactly:
      S3 download (boto3, the same moto server as (c)) -> Pillow decode -> resize for the
      model -> model -> argmax -> threshold -> 7x7 Gaussian blur -> mask resized to full
      resolution -> float64 blend onto white -> OpenCV encode in the job's format (PNG at
      OpenCV's default level; JPEG at the job's default quality 92 with 4:4:4 chroma, as the
      worker writes it) -> S3 upload.
      They skip everything else a job does: no refinement of the mask's edges, no colour
      estimation (decontamination), no EXIF orientation, no ICC profile, no size checks, no
      database record, no retries.
      (b1) the tutorial's loop: the model sees the photo's SHORT side at --tutorial-size.
      (b2) the same loop at our input size: the LONG side at --input-size, as the worker.
  (c) end to end: jobs (the default remove -> white job, in that format) submitted through
      the Python client into Redis, photos in S3 (moto's HTTP server on loopback), records in
      PostgreSQL, processed by a real `backdrop worker`. Its rate is photos over the jobs' own
      span, from the first `started_at` to the last `finished_at`; the client only submits
      and waits.

Each round runs (b1), (b2) and (c) in turn for every format, so a noisy neighbour slows all
of them, not one; the loops run beside the max-batch worker only, as their ratios are to it.
Per photo it prints the stage times the job records give (`timings_ms`), the loops' own
stage times, the CPU each process used (worker, S3 server, PostgreSQL, Redis, this process),
and where the rest of the wall time went: queueing before a job starts, time inside a job
outside its stages, and idle cores (or cores other processes took).

It also times each stage of the default job on one thread at 1600x1200 (decode, segment,
refine, decontaminate, composite, encode as PNG and as JPEG: what a stage costs a core), and
ends with one TARGET line per target of issue 13: codecs and compositing together per job,
and (c) at max batch over (b2) (MobileNetV3; PNG and JPEG) or (b1) (ResNet-101), as the
ratio of the rounds' means and of each side's best round.

Random-init weights unless --weights is given. The model's speed does not depend on their
values, but refinement's and colour estimation's do: their work follows the mask's edge.
--masks subject (the default) trains the classifier (the backbone stays random) to outline
each photo's subject, so masks have one subject and a real photo's edge length (about 3% of
the photo in the edge band); --masks noise keeps varying_model's blobs all over the frame
(a quarter of the photo in the band): the worst case for edge work, several times a real
photo's. Both are tests/support/weights.py's; subject weights take ~2 min to train once and
are cached in ~/.cache/backdrop-bench.
Needs PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379 and moto (the dev extra).

    .venv/bin/python bench/throughput.py [--model deeplabv3_mobilenet_v3_large] [--photos 24]
        [--max-batch N] [--rounds 2] [--input-size N] [--tutorial-size 520]
        [--formats png,jpeg] [--masks subject|noise] [--memory-jobs 0]
    .venv/bin/python bench/throughput.py --model deeplabv3_resnet101 --photos 6
    .venv/bin/python bench/throughput.py --photos 32 --formats jpeg --rounds 4 \
        --variant BACKDROP_TORCH_THREADS=1 [--variant-concurrency N]

--variant NAME=VALUE (repeatable) or --variant-concurrency N runs (c) alone instead, a fresh
worker per round alternating between the default and the variant (whose environment adds
those settings, or whose Celery thread pool has N threads), two batches of the photos per
round and format, and prints both rates and their ratio: a way to try a thread plan on this
machine.

The worker's model sees the photo's long side at --input-size; the tutorial's sees its short
side at --tutorial-size. --input-size defaults to the worker's 520, except for ResNet-101,
whose target is at the tutorial's input size: 693, the same pixels as the tutorial's on these
4:3 photos. --max-batch defaults to the worker's on this device (1 on a CPU, 8 on a GPU); the
worker also runs at max batch 1 when that differs. On a GPU the loops run their model there
too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import boto3
import cv2
import numpy as np
import redis
import skimage.data
import torch
from PIL import Image
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer import broker
from producer.client import Client
from producer.services import Services as Wiring
from producer.settings import Settings
from producer.storage import Storage
from tests.support.postgres import fresh_database
from tests.support.services import S3_TEST_CREDENTIALS, MotoServer, WorkerProcess
from tests.support.weights import save_subject_weights, save_varying_weights
from worker.segmenter import Segmenter
from worker.threadplan import default_max_batch
from worker.weights import MODELS, load_model

SIZES = ((1280, 960), (1600, 1200), (2000, 1500))  # 1.2, 1.9 and 3.0 MP
PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left")
# Its own DB: bench/interactive_latency.py flushes and consumes 13, and a worker drops
# (acks) a message whose job its database does not hold.
REDIS_URL = "redis://127.0.0.1:6379/14"
# Models whose target is at the tutorial's input size (the worker's default then matches it).
TUTORIAL_SIZE_MODELS = {"deeplabv3_resnet101"}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
JPEG_QUALITY = 92  # the job's default jpeg_quality
# The worker keeps full chroma at quality >= 90; OpenCV's 4:4:4 code.
JPEG_444 = 0x111111
LOOP_STAGES = ("download", "decode", "segment", "composite", "encode", "upload")
# A job's stages in the order it runs them; any other stage a record names comes after.
JOB_STAGES = (
    "download",
    "decode",
    "segment",
    "refine",
    "decontaminate",
    "composite",
    "encode",
    "upload",
)


def make_photos(count: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[bytes]:
    folder = Path(skimage.data.__file__).parent
    sources = [cv2.imread(str(folder / f"{name}.png")) for name in PHOTOS]
    photos = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        big = cv2.resize(sources[i % len(sources)], (width, height), interpolation=cv2.INTER_CUBIC)
        photos.append(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
    return photos


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


STAGE_SIZE = (1600, 1200)  # "2 MP": the middle of SIZES


def stage_cpu(segmenter: Segmenter, photos: int = 8) -> tuple[dict[str, float], float]:
    """CPU ms per stage of the default job (remove -> white), median over photos at
    STAGE_SIZE, on one thread (OpenCV's and torch's): what each stage costs a core; and the
    mean share of the photo in the alpha's edge band (0 < alpha < 255)."""
    from worker.composite import remove_background
    from worker.foreground import estimate_foreground
    from worker.imageio import decode_image, encode_image
    from worker.refine import refine_mask

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    costs: dict[str, list[float]] = {}
    bands = []

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        started = time.thread_time()
        yield
        costs.setdefault(stage, []).append((time.thread_time() - started) * 1000)

    try:
        for data in make_photos(photos + 1, (STAGE_SIZE,)):
            with timed("decode"):
                photo = decode_image(data, max_pixels=10**9, max_bytes=10**9)
            with timed("segment"):
                soft = segmenter.predict([photo.rgb], [range(1, 21)])[0]
            with timed("refine"):
                alpha = refine_mask(soft, photo.rgb)
            bands.append(cv2.countNonZero(cv2.inRange(alpha, 1, 254)) / alpha.size)
            with timed("decontaminate"):
                colours = estimate_foreground(photo.rgb, alpha)
            with timed("composite"):
                pixels = remove_background(colours, alpha, (255, 255, 255))
            with timed("encode png"):
                encode_image(pixels, "png")
            with timed("encode jpeg"):
                encode_image(pixels, "jpeg", quality=JPEG_QUALITY)
    finally:
        torch.set_num_threads(threads)
    medians = {stage: float(np.median(ms[1:])) for stage, ms in costs.items()}  # first: warm-up
    return medians, float(np.mean(bands))


MASKS = {
    "subject": "classifier trained to outline each photo's subject; a real photo's edge length",
    "noise": "blobs all over the frame; the worst case for edge work",
}
# The subject training (150 steps at 390 px) gives ResNet-101 one constant map at its 693-px
# input (0.31 everywhere: no subject, no edge), so the ResNets keep noise masks: the worst case
# for the worker's edge work, which makes their ratio a lower bound.
DEFAULT_MASKS = {"deeplabv3_mobilenet_v3_large": "subject"}
CACHE = Path.home() / ".cache" / "backdrop-bench"


def bench_weights(model: str, masks: str, folder: Path) -> Path:
    """Random-init weights for `model` giving `masks`; subject weights cached by the code
    that trains them (a change to it trains them anew)."""
    if masks == "noise":
        return save_varying_weights(model, folder / f"{model}-noise.pth")
    import tests.support.weights as support

    source = Path(support.__file__).read_bytes() + torch.__version__.encode()
    path = CACHE / f"{model}-subject-{hashlib.sha256(source).hexdigest()[:12]}.pth"
    if not path.exists():
        print(f"training {model}'s classifier to outline subjects (once; cached at {path})")
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_subject_weights(model, partial)
        partial.replace(path)
    return path


def short_side(size: int) -> Callable[[Image.Image], Image.Image]:
    """The tutorial's T.Resize(size): the short side to `size`."""
    return lambda image: TF.resize(image, size)


def long_side(size: int) -> Callable[[Image.Image], Image.Image]:
    """The worker's fit: the long side to `size`."""

    def fit(image: Image.Image) -> Image.Image:
        scale = size / max(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)))

    return fit


@dataclass
class Loop:
    """(b): one photo at a time, in this process; see the module docstring for its stages."""

    label: str
    model: torch.nn.Module
    fit: Callable[[Image.Image], Image.Image]
    device: str
    s3: object
    rates: dict[str, list[float]] = field(default_factory=dict)
    stage_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    def one(self, location: str, fmt: str, ms: dict[str, float]) -> None:
        bucket, key = location.removeprefix("s3://").split("/", 1)
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            ms[stage] = ms.get(stage, 0.0) + (now - clock) * 1000
            clock = now

        data = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        lap("download")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        lap("decode")
        batch = TF.normalize(TF.to_tensor(self.fit(image)), MEAN, STD).unsqueeze(0)
        with torch.no_grad():
            out = self.model(batch.to(self.device))["out"]
        classes = torch.argmax(out.squeeze(), dim=0).cpu().numpy()
        lap("segment")
        _, alpha = cv2.threshold(classes.astype(np.uint8), 0, 255, cv2.THRESH_BINARY)
        alpha = cv2.GaussianBlur(alpha, (7, 7), 0)
        foreground = np.asarray(image)
        alpha = cv2.resize(alpha, (foreground.shape[1], foreground.shape[0]))
        alpha = np.repeat(alpha[..., None], 3, axis=2).astype(float) / 255
        background = 255 * np.ones_like(foreground).astype(float)
        blended = cv2.add(
            cv2.multiply(alpha, foreground.astype(float)), cv2.multiply(1.0 - alpha, background)
        )
        bgr = blended.astype(np.uint8)[..., ::-1]
        lap("composite")
        if fmt == "png":
            encoded = cv2.imencode(".png", bgr)[1].tobytes()
        else:
            params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR]
            encoded = cv2.imencode(".jpg", bgr, [*params, JPEG_444])[1].tobytes()
        lap("encode")
        self.s3.put_object(  # type: ignore[attr-defined]
            Bucket=bucket, Key=f"loop-out/{uuid.uuid4().hex}.{fmt}", Body=encoded
        )
        lap("upload")

    def measure(self, locations: list[str], fmt: str, processes: dict[str, list[int]]) -> None:
        self.one(locations[0], fmt, {})  # warm-up
        ms: dict[str, float] = {}
        before = {name: cpu_seconds(pids) for name, pids in processes.items()}
        started = time.perf_counter()
        for location in locations:
            self.one(location, fmt, ms)
        self.rates.setdefault(fmt, []).append(len(locations) / (time.perf_counter() - started))
        self.stage_ms[fmt] = {stage: ms[stage] / len(locations) for stage in LOOP_STAGES}
        self.cpu_ms[fmt] = cpu_ms_per_photo(before, processes, len(locations))

    def rate(self, fmt: str) -> float:
        return float(np.mean(self.rates[fmt]))

    def best(self, fmt: str) -> float:
        return max(self.rates[fmt])


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU each process has used so far (threads included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone: a PostgreSQL backend that closed
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def cpu_ms_per_photo(
    before: dict[str, dict[int, float]], processes: dict[str, list[int]], photos: int
) -> dict[str, float]:
    """CPU since `before`, per photo, by name. A process that exited in between (a Redis or
    PostgreSQL backend of someone else's) drops out rather than counting negative."""
    ms = {}
    for name, pids in processes.items():
        now = cpu_seconds(pids)
        used = sum(now[pid] - before[name].get(pid, 0.0) for pid in now)
        ms[name] = used / photos * 1000
    return ms


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


def moment(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


class Services:
    """A fresh PostgreSQL database, a Redis DB, moto's S3 server, and a real worker."""

    def __init__(self, weights: Path, model: str, input_size: int, folder: Path) -> None:
        self.cleanup = ExitStack()
        database_url = self.cleanup.enter_context(fresh_database("backdrop_bench"))
        redis.Redis.from_url(REDIS_URL).flushdb()
        os.environ.update(S3_TEST_CREDENTIALS)
        self.moto = self.cleanup.enter_context(MotoServer())
        self.s3_client = boto3.client("s3", endpoint_url=self.moto.endpoint)
        self.s3_client.create_bucket(Bucket="bench")
        self.env = {
            "BACKDROP_DATABASE_URL": database_url,
            "BACKDROP_BROKER_URL": REDIS_URL,
            "BACKDROP_S3_ENDPOINT_URL": self.moto.endpoint,
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
        self.client = Client(
            Wiring(
                self.settings,
                storage=Storage(self.settings),
                celery=broker.make_celery(self.settings),
            )
        )
        self.folder = folder
        self.worker: WorkerProcess | None = None

    def start_worker(
        self, max_batch: int, env: dict[str, str] | None = None, concurrency: int | None = None
    ) -> None:
        self.log = self.folder / f"worker-batch-{max_batch}.log"
        env = {**self.env, **(env or {}), "BACKDROP_MAX_BATCH": str(max_batch)}
        self.worker = WorkerProcess(env, self.log, concurrency=concurrency).start().wait_ready()

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
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

    def run(self, locations: list[str], fmt: str = "jpeg") -> tuple[float, list[dict]]:
        """Submit and wait; the client's own rate (submit to the last record seen final)."""
        started = time.perf_counter()
        # Full work whatever the random weights' masks hold: a job failed as no_subject skips
        # colour estimation, compositing, encoding and upload, and would flatter (c).
        jobs = [{"input": loc, "format": fmt, "fail_on_no_subject": False} for loc in locations]
        records = self.client.submit_many(jobs)
        finished = self.client.wait([r["id"] for r in records], timeout=3600)
        return len(locations) / (time.perf_counter() - started), finished

    def processes(self, worker: bool = True) -> dict[str, list[int]]:
        """Where the CPU goes, by process (PostgreSQL: every backend)."""
        found = {"worker": [self.worker.pid]} if worker and self.worker else {}
        return {
            **found,
            "S3 server": [self.moto.pid],
            "PostgreSQL": pids_named("postgres"),
            "Redis": pids_named("redis-server"),
            "this process": [os.getpid()],
        }

    def worker_rss_mb(self) -> float:
        assert self.worker is not None
        for line in Path(f"/proc/{self.worker.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.stop_worker()
        self.cleanup.close()


@dataclass
class EndToEnd:
    """(c) at one max batch size and one output format, over several rounds."""

    max_batch: int
    fmt: str
    rates: list[float] = field(default_factory=list)
    client_rates: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    client_wall_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    failed: int = 0  # over every round

    @property
    def rate(self) -> float:
        return float(np.mean(self.rates))

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def span_s(self) -> float:
        """The jobs' own span: first start to last finish."""
        first = min(moment(r["started_at"]) for r in self.records)
        last = max(moment(r["finished_at"]) for r in self.records)
        return (last - first).total_seconds()

    def measure(self, services: Services, photos: list[bytes]) -> None:
        locations = services.upload(photos)
        processes = services.processes()
        before = {name: cpu_seconds(pids) for name, pids in processes.items()}
        started = time.perf_counter()
        client_rate, self.records = services.run(locations, self.fmt)
        self.failed += sum(r["status"] != "succeeded" for r in self.records)
        self.client_wall_s = time.perf_counter() - started
        self.client_rates.append(client_rate)
        self.rates.append(len(photos) / self.span_s)
        self.cpu_ms = cpu_ms_per_photo(before, processes, len(photos))


def measure_end_to_end(
    services: Services,
    photos: list[bytes],
    batches: list[int],
    formats: list[str],
    rounds: int,
    loops: list[Loop],
) -> dict[tuple[int, str], EndToEnd]:
    """Per max batch size: a fresh worker, warmed up, then rounds of (c), per format; beside
    the largest, every loop in turn with it, so they see the same machine."""
    results: dict[tuple[int, str], EndToEnd] = {}
    locations = services.upload(photos)
    for batch in batches:
        services.start_worker(batch)
        try:
            for fmt in formats:  # warm-up: model load, first shapes, each encoder
                services.run(services.upload(photos[:4]), fmt)
            skip = len(services.batch_sizes())
            for fmt in formats:
                results[batch, fmt] = EndToEnd(batch, fmt)
            for _ in range(rounds):
                for fmt in formats:
                    for loop in loops if batch == batches[-1] else []:
                        loop.measure(locations, fmt, services.processes(worker=False))
                    results[batch, fmt].measure(services, photos)
            for fmt in formats:
                results[batch, fmt].batch_sizes = services.batch_sizes()[skip:]
        finally:
            services.stop_worker()
    return results


def compare_variant(
    services: Services,
    photos: list[bytes],
    variant: dict[str, str],
    concurrency: int | None,
    args: argparse.Namespace,
) -> None:
    """(c) alone: the default worker and the variant, a fresh worker each, alternated."""
    rates: dict[tuple[str, str], list[float]] = {}
    sides = {"default": ({}, None), "variant": (variant, concurrency)}
    for round_ in range(args.rounds):
        for side in ("default", "variant") if round_ % 2 == 0 else ("variant", "default"):
            env, threads = sides[side]
            services.start_worker(args.max_batch, env, threads)
            try:
                for fmt in args.formats.split(","):
                    services.run(services.upload(photos[:4]), fmt)  # warm-up
                    for _ in range(2):
                        result = EndToEnd(args.max_batch, fmt)
                        result.measure(services, photos)
                        rates.setdefault((side, fmt), []).append(result.rate)
            finally:
                services.stop_worker()
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)
    described = " ".join(f"{k}={v}" for k, v in variant.items())
    if concurrency:
        described += f" --concurrency {concurrency}"
    print(f"variant: {described.strip()}; (c) images/s, each a batch of {len(photos)} photos")
    for fmt in args.formats.split(","):
        default, other = rates["default", fmt], rates["variant", fmt]
        for side, values in (("default", default), ("variant", other)):
            listed = ", ".join(f"{v:.2f}" for v in values)
            print(f"{fmt} {side:8} mean {np.mean(values):.2f}  ({listed})")
        print(f"{fmt} variant / default = {np.mean(other) / np.mean(default):.3f}")


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
    parser.add_argument(
        "--max-batch", type=int, help="the worker's; default: its default on this device"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        help="the worker's BACKDROP_MODEL_INPUT_SIZE: the LONG side the model sees "
        "[default: 520; ResNet-101: --tutorial-size's long side on 4:3 photos, 693]",
    )
    parser.add_argument(
        "--tutorial-size",
        type=int,
        default=520,
        help="the tutorial's T.Resize: the SHORT side (693 long on a 4:3 photo at 520)",
    )
    parser.add_argument("--formats", default="png,jpeg", help="output formats, e.g. png,jpeg")
    parser.add_argument("--rounds", type=int, default=2, help="(b) and (c) rounds, alternated")
    parser.add_argument(
        "--masks",
        choices=("subject", "noise"),
        help="random-init weights whose masks outline one subject, or blobs all over the frame "
        "[default: subject for MobileNetV3, noise for the ResNets]",
    )
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=0,
        help="also run N jobs and compare worker RSS after 200 and N",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="run (c) alone, alternating the default worker with one whose environment adds this",
    )
    parser.add_argument(
        "--variant-concurrency",
        type=int,
        help="run (c) alone, alternating the default worker with one of N job threads",
    )
    args = parser.parse_args()
    formats = args.formats.split(",")
    if not set(formats) <= {"png", "jpeg"}:
        parser.error("--formats takes png and/or jpeg")

    folder = Path(tempfile.mkdtemp(prefix="backdrop-bench-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.max_batch = args.max_batch or default_max_batch(device)
    if args.input_size is None:
        at_tutorial = args.model in TUTORIAL_SIZE_MODELS
        args.input_size = round(args.tutorial_size * 4 / 3) if at_tutorial else 520
    args.masks = args.masks or DEFAULT_MASKS.get(args.model, "noise")
    weights = args.weights or bench_weights(args.model, args.masks, folder)
    photos = make_photos(args.photos)
    if args.variant or args.variant_concurrency:
        variant = dict(item.split("=", 1) for item in args.variant)
        services = Services(weights, args.model, args.input_size, folder)
        try:
            compare_variant(services, photos, variant, args.variant_concurrency, args)
        finally:
            services.close()
        return
    segmenter = Segmenter.load(
        args.model, weights=str(weights), device=device, input_size=args.input_size
    )
    print(f"device: {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)")
    print(
        f"model: {args.model}, weights {segmenter.weights_id}; model input: worker long side "
        f"{args.input_size}, tutorial short side {args.tutorial_size}"
    )
    if not args.weights:
        print(f"masks: {args.masks} ({MASKS[args.masks]})")
    sizes_text = ", ".join(f"{w}x{h}" for w, h in SIZES)
    print(f"photos: {len(photos)} JPEGs at {sizes_text} in S3; max batch {args.max_batch}")
    print(f"(b) and (c) alternate over {args.rounds} rounds per format; figures are their means")

    batches = sorted({1, args.max_batch})
    model_rates = {b: model_only(segmenter, photos, b) for b in batches}
    stages, band = stage_cpu(segmenter)
    del segmenter
    loop_model = load_model(args.model, weights).to(device).eval()

    services = Services(weights, args.model, args.input_size, folder)
    try:
        loops = [
            Loop(
                f"(b1) tutorial loop, short side {args.tutorial_size}",
                loop_model,
                short_side(args.tutorial_size),
                device,
                services.s3_client,
            ),
            Loop(
                f"(b2) same loop, long side {args.input_size} (ours)",
                loop_model,
                long_side(args.input_size),
                device,
                services.s3_client,
            ),
        ]
        e2e = measure_end_to_end(services, photos, batches, formats, args.rounds, loops)
        memory = (
            measure_memory(services, args.memory_jobs, args.max_batch) if args.memory_jobs else None
        )
    finally:
        services.close()
    report(model_rates, loops, e2e, formats, args.max_batch)
    report_targets(args.model, args.input_size, loops, e2e, formats, args.max_batch, stages, band)
    if memory:
        report_memory(memory, args.memory_jobs)


def report(
    model_rates: dict[int, float],
    loops: list[Loop],
    e2e: dict[tuple[int, str], EndToEnd],
    formats: list[str],
    max_batch: int,
) -> None:
    batches = sorted({batch for batch, _ in e2e})
    print()
    header = "".join(f" {fmt + ' img/s':>11}" for fmt in formats)
    print(f"{'pipeline':52}{header}")
    for b, rate in model_rates.items():
        print(f"{'(a) model only, batch ' + str(b):52}" + f" {rate:11.2f}" * len(formats))
    for loop in loops:
        print(f"{loop.label:52}" + "".join(f" {loop.rate(fmt):11.2f}" for fmt in formats))
    for b in batches:
        label = f"(c) end to end, max batch {b} (jobs' own span)"
        print(f"{label:52}" + "".join(f" {e2e[b, fmt].rate:11.2f}" for fmt in formats))
    print()
    for fmt in formats:
        best = e2e[max_batch, fmt]
        ratios = [
            f"(c)/{loop.label.split()[0]} = {best.rate / loop.rate(fmt):.2f}x" for loop in loops
        ]
        ratios.append(f"(c)/(a) at batch {max_batch} = {best.rate / model_rates[max_batch]:.2f}x")
        if max_batch != 1:
            ratios.append(f"(c) batch {max_batch} / batch 1 = {best.rate / e2e[1, fmt].rate:.2f}x")
        print(f"{fmt}: " + "    ".join(ratios))
    for loop in loops:
        for fmt in formats:
            print(f"{loop.label.split()[0]} {fmt}, ms per photo: " + per_stage(loop.stage_ms[fmt]))
            print("  CPU ms per photo: " + per_process(loop.cpu_ms[fmt]))
    for (b, fmt), result in e2e.items():
        report_end_to_end(result, b, fmt)


def per_stage(ms: dict[str, float]) -> str:
    return ", ".join(f"{stage} {value:.0f}" for stage, value in ms.items()) + (
        f"; sum {sum(ms.values()):.0f}"
    )


def per_process(ms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f}" for name, value in ms.items()) + (
        f"; total {sum(ms.values()):.0f}"
    )


def report_end_to_end(result: EndToEnd, batch: int, fmt: str) -> None:
    """Stage times from the last round's job records, and where the rest of the wall went."""
    records = result.records
    count = len(records)
    failed = sum(r["status"] != "succeeded" for r in records)
    sizes = result.batch_sizes or [0]
    print(
        f"(c) max batch {batch}, {fmt}: jobs failed {failed}; model batches {len(sizes)}, "
        f"mean size {np.mean(sizes):.1f}, max {max(sizes)}"
    )
    named = {st for r in records for st in r["timings_ms"] or {}}
    stages = [st for st in JOB_STAGES if st in named] + sorted(named - set(JOB_STAGES))
    means = {
        st: float(np.mean([(r["timings_ms"] or {}).get(st, 0.0) for r in records])) for st in stages
    }
    print(
        "  job stage ms per photo (timings_ms: wall, overlapping other jobs' stages): "
        + per_stage(means)
    )
    in_job = float(
        np.mean(
            [
                (moment(r["finished_at"]) - moment(r["started_at"])).total_seconds() * 1000
                for r in records
            ]
        )
    )
    queued = float(
        np.mean(
            [
                (moment(r["started_at"]) - moment(r["created_at"])).total_seconds() * 1000
                for r in records
            ]
        )
    )
    print(
        f"  per job: queued {queued:.0f} ms before its start; started to finished {in_job:.0f} ms,"
        f" of which {in_job - sum(means.values()):.0f} outside its stages"
    )
    cores = os.cpu_count() or 1
    available = cores * result.client_wall_s / count * 1000
    used = sum(result.cpu_ms.values())
    print("  CPU ms per photo: " + per_process(result.cpu_ms))
    print(
        f"  wall: jobs' span {result.span_s:.2f} s, client submit-to-done "
        f"{result.client_wall_s:.2f} s; {cores} cores give {available:.0f} CPU ms per photo "
        f"over the client's window, {used:.0f} used by these, {available - used:.0f} idle "
        "or other processes'"
    )


# issue 13's targets: (c) at max batch over a loop, by model and format; ≥ these.
RATIO_TARGETS = {
    ("deeplabv3_mobilenet_v3_large", "png", "(b2)"): 1.0,
    ("deeplabv3_mobilenet_v3_large", "jpeg", "(b2)"): 1.4,
    ("deeplabv3_resnet101", "png", "(b1)"): 1.2,
    ("deeplabv3_resnet101", "jpeg", "(b1)"): 1.2,
}
CODECS_AND_COMPOSITING_TARGET_MS = 60.0


def report_targets(
    model: str,
    input_size: int,
    loops: list[Loop],
    e2e: dict[tuple[int, str], EndToEnd],
    formats: list[str],
    max_batch: int,
    stages: dict[str, float],
    band: float,
) -> None:
    """One labelled line per target: the ratio measured side by side in this run, of the
    rounds' means and of each side's best round (the least disturbed by other load: a loop
    whose OpenMP threads spin suffers far more from a busy machine than the worker)."""
    print()
    width, height = STAGE_SIZE
    print(
        f"worker CPU per default job at {width}x{height}, one thread, ms (median): "
        + ", ".join(f"{stage} {ms:.1f}" for stage, ms in stages.items())
        + f"; edge band {band:.1%} of the photo"
    )
    for fmt in formats:
        codecs = stages["decode"] + stages["composite"] + stages[f"encode {fmt}"]
        verdict = "met" if codecs <= CODECS_AND_COMPOSITING_TARGET_MS else "NOT met"
        print(
            f"TARGET codecs + compositing ({fmt}: decode + composite + encode) = {codecs:.1f} ms"
            f" (<= {CODECS_AND_COMPOSITING_TARGET_MS:.0f}: {verdict})"
        )
    for loop in loops:
        name = loop.label.split()[0]
        for fmt in formats:
            target = RATIO_TARGETS.get((model, fmt, name))
            if target is None:
                continue
            result = e2e[max_batch, fmt]
            ratio, best = result.rate / loop.rate(fmt), result.best / loop.best(fmt)
            verdict = "met" if min(ratio, best) >= target else "NOT met"
            if result.failed:  # failed jobs skip work: their rate says nothing
                verdict = f"INVALID: {result.failed} jobs failed"
            print(
                f"TARGET {model} {fmt}: (c) max batch {max_batch}, long side {input_size} / "
                f"{loop.label} = "
                f"{ratio:.2f}x of means, {best:.2f}x of best rounds "
                f"({len(result.rates)}) (>= {target}: {verdict})"
            )


def report_memory(memory: dict[str, float], memory_jobs: int) -> None:
    print(f"worker RSS over {memory_jobs} jobs, MB: ", end="")
    print(", ".join(f"{name} {mb:.0f}" for name, mb in memory.items()))
    for kind in ("peak", "end"):
        growth = (memory[f"last 200 {kind}"] / memory[f"first 200 {kind}"] - 1) * 100
        print(f"  {kind}: last 200 vs first 200 jobs {growth:+.1f}%")


if __name__ == "__main__":
    main()
