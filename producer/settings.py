"""One typed settings object, read from the environment once per process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.catalog import ModelName

CommaList = Annotated[list[str], NoDecode]

PngCompression = Literal["fast", "small"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BACKDROP_", extra="ignore")

    # Where the embedded default keeps its SQLite file, broker folders and local storage.
    data_dir: Path = Path(".backdrop")

    database_url: str = ""
    broker_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Short connect timeout: an unreachable store should fail a job attempt fast (it is
    # retried); the read timeout bounds a stalled transfer of a large photo or weights file.
    s3_connect_timeout_s: float = Field(default=5.0, gt=0)
    s3_read_timeout_s: float = Field(default=60.0, gt=0)
    # botocore "standard" retry mode attempts, first try included.
    s3_max_attempts: int = Field(default=4, ge=1, le=20)
    output_prefix: str = ""
    # Where `backdrop submit LOCAL_FILE` uploads a plain local file before queueing it.
    input_prefix: str = ""
    allowed_buckets: CommaList = Field(default_factory=list)
    # The folders file:// locations may touch, besides the input and output prefixes' own
    # folders (by default the data dir's inputs/ and outputs/; never the data dir itself,
    # which holds the database and the broker folder).
    local_roots: CommaList = Field(default_factory=list)

    model: ModelName = "deeplabv3_resnet101"
    weights: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Photos per model call; None: 8 on a GPU, 1 on a CPU, where batching only slows the
    # worker (worker/threadplan.py).
    max_batch: int | None = Field(default=None, ge=1, le=256)
    # Torch's intra-op threads on a CPU worker; None: every core (see worker/runner.py).
    torch_threads: int | None = Field(default=None, ge=1, le=512)
    # Jobs decoding, refining, compositing or encoding at once; None: one per core
    # (worker/threadplan.py).
    cpu_slots: int | None = Field(default=None, ge=1, le=512)
    # Model calls a worker runs at once, each on torch_threads / model_lanes threads; None: 2
    # for the ResNets on a CPU, else 1 (worker/threadplan.py).
    model_lanes: int | None = Field(default=None, ge=1, le=64)
    max_wait_ms: int = Field(default=20, ge=0, le=10_000)
    # The long side of the image the model sees, whatever the photo's aspect ratio, so a
    # photo's cost is bounded. (torchvision evaluated these weights with the SHORT side at
    # 520: 693 here matches that for 4:3 photos, at 1.8x the model time.)
    model_input_size: int = Field(default=520, ge=64, le=2048)
    # PNG outputs: "fast" (fpng, ~15 ms of CPU at 2 MP) or "small" (zlib level 3, 10-25x
    # the CPU for files 13-25% smaller). See bench/codecs.py.
    png_compression: PngCompression = "fast"

    max_input_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=100_000_000, ge=1)
    # Memory a worker's job threads may hold in decoded images and their working buffers at
    # once (jobs beyond it wait; one photo needing more fails input_too_large). None: half the
    # container's memory limit, or of the machine's memory (worker/budget.py).
    memory_budget_mb: int | None = Field(default=None, ge=1)

    api_tokens: CommaList = Field(default_factory=list)
    # With no tokens the API refuses to start unless this is set: an open API must be a choice.
    api_insecure_no_auth: bool = False
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # Jobs per POST /v1/jobs: bounds the memory and the transaction one request may take.
    api_max_batch: int = Field(default=10_000, ge=1)
    # Bytes of a POST /v1/jobs body, counted as it streams in (chunked bodies included):
    # 10,000 requests with long S3 keys, a background and an idempotency key take about 5 MB.
    # Every other route takes at most 64 KiB.
    api_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Requests per second (and burst) one client address may make without a valid token:
    # /metrics, /healthz, the dashboard page, and refused /v1 calls. 0: no limit (behind a
    # proxy every client shares its address; uvicorn trusts X-Forwarded-For from loopback).
    api_rate_limit_per_s: float = Field(default=5.0, ge=0)
    api_rate_limit_burst: int = Field(default=20, ge=1)
    # /metrics reads the job counts at most this often; scrapes in between get the last ones.
    api_metrics_refresh_s: float = Field(default=5.0, ge=0)
    # /v1/stats/series reads the 1 h window at most this often (the 24 h one, ~3 s of
    # database time at 500k jobs, six times less often); requests in between share it.
    api_series_refresh_s: float = Field(default=10.0, ge=0)
    # Swagger UI and ReDoc load their scripts from a CDN: off unless asked for.
    # /openapi.json is always served.
    api_docs: bool = False
    # Thumbnails are decoded (PNG, JPEG, WebP only) and re-encoded small, never served as
    # stored. A stored image over this many bytes, or over this many pixels once decoded
    # (JPEGs decode at up to 1/8 scale), gets no thumbnail (413).
    api_thumbnail_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    api_thumbnail_max_pixels: int = Field(default=25_000_000, ge=1)
    # S3 job records carry presigned GET URLs of their outputs (output_url, mask_url), computed
    # when the record is served; they expire this long after (S3 allows at most 7 days).
    presign_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # Where a worker serves its Prometheus metrics; None: not served.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Loopback unless set: the metrics server has no authentication. Containers set 0.0.0.0
    # (their own network namespace) so Prometheus can scrape them.
    worker_metrics_host: str = "127.0.0.1"

    # A backfill never has more than this many of its jobs queued or running at once.
    backfill_max_in_flight: int = Field(default=1000, ge=1)
    # Photos a backfill lists, checks and inserts per transaction.
    backfill_chunk: int = Field(default=500, ge=1, le=5000)

    # Longest a job may run before the broker hands its message to another worker.
    # (Bound lowered from 60 to 5 so the outage tests can watch Redis redeliver quickly;
    # in production keep it long: running jobs are protected by their leases, not by this.)
    visibility_timeout_s: int = Field(default=3600, ge=5)
    max_attempts: int = Field(default=5, ge=1)
    # A running job's lease: renewed by its worker every third of it; when it runs out (the
    # worker died), the reaper requeues the job. Bounds recovery time after a crash.
    job_lease_s: float = Field(default=60.0, gt=0)
    # An attempt still running after this long (a thread stuck in a decoder on a hostile
    # photo, say) stops having its lease renewed, so the job is retried elsewhere and ends
    # worker_lost after max_attempts instead of staying `running` forever.
    job_timeout_s: float = Field(default=600.0, gt=0)

    # Completion callbacks (producer/callbacks.py): the HMAC key (none: callback_url is
    # refused), hosts that may be called over http or at private addresses, per-attempt
    # limits, and the retry schedule: 12 attempts from 10 s doubling to 15 min cover ~80 min.
    callback_secret: SecretStr | None = None
    callback_allowed_hosts: CommaList = Field(default_factory=list)
    callback_connect_timeout_s: float = Field(default=5.0, gt=0)
    callback_timeout_s: float = Field(default=10.0, gt=0)
    callback_concurrency: int = Field(default=4, ge=1, le=64)
    callback_max_attempts: int = Field(default=12, ge=1, le=100)
    callback_retry_base_s: float = Field(default=10.0, gt=0)
    callback_retry_max_s: float = Field(default=900.0, gt=0)
    # How often a worker looks for due deliveries besides being nudged by a finished job.
    callback_poll_s: float = Field(default=2.0, gt=0)

    @field_validator(
        "allowed_buckets", "local_roots", "api_tokens", "callback_allowed_hosts", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def model_post_init(self, __context: object) -> None:
        data = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'backdrop.db'}"
        if not self.broker_url:
            # "localhost" only quiets kombu; the filesystem transport needs no server.
            self.broker_url = "filesystem://localhost//"
        if not self.output_prefix:
            self.output_prefix = (data / "outputs").as_uri()
        if not self.input_prefix:
            self.input_prefix = (data / "inputs").as_uri()
        if not self.local_roots:
            self.local_roots = [str(data / "inputs"), str(data / "outputs")]
        # Where `submit FILE` uploads and where results go by default are always roots, so
        # setting BACKDROP_LOCAL_ROOTS for photos elsewhere never breaks the everyday flow.
        own = [
            unquote(prefix.removeprefix("file://"))
            for prefix in (self.input_prefix, self.output_prefix)
            if prefix.startswith("file://")
        ]
        self.local_roots = list(dict.fromkeys([*self.local_roots, *own]))

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.data_dir.resolve() / "broker"


_current: Settings | None = None


def get_settings() -> Settings:
    global _current
    if _current is None:
        _current = Settings()
    return _current


def configure(**overrides: Any) -> Settings:
    """Replace the process's settings: environment plus explicit overrides (CLI flags).

    Call it before anything builds clients from the settings (the CLI does, first thing).
    """
    global _current
    _current = Settings(**{k: v for k, v in overrides.items() if v is not None})
    return _current
