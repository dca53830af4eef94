"""Shared fixtures: real photos, real services (skipped on a laptop, required in CI)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from producer.settings import Settings
    from tests.support.receiver import Receiver

IN_CI = os.environ.get("CI", "").lower() == "true"
SKIMAGE_DATA = Path(__import__("skimage").data.__file__).parent
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "motorcycle_left")


def require_service(name: str, available: bool, detail: str = "") -> None:
    """Skip a test whose service is missing on a laptop; fail it in CI, where it must run."""
    if available:
        return
    message = f"{name} is not reachable{': ' + detail if detail else ''}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: integration tests must not skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def photo_paths() -> dict[str, Path]:
    """Real photographs that scikit-image ships as files."""
    return {name: SKIMAGE_DATA / f"{name}.png" for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def photo_bytes(photo_paths: dict[str, Path]) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in photo_paths.items()}


# --- databases ---------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _postgres_reachable() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    from sqlalchemy import create_engine, text

    from producer.db import upgrade

    require_service("PostgreSQL", _postgres_reachable(), "127.0.0.1:5432")
    name = f"backdrop_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    yield url
    from producer.db import get_engine

    get_engine(url).dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each job-store test runs on both databases; PostgreSQL tables are emptied per test."""
    if request.param == "sqlite":
        from producer.db import upgrade

        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    from sqlalchemy import text

    from producer.db import get_engine

    with get_engine(url).begin() as connection:
        connection.execute(text("TRUNCATE jobs"))


# --- polling, Redis, model weights ------------------------------------------------------


def poll_until(condition: Callable[[], object], *, timeout: float, what: str) -> None:
    """Wait for a condition with a deadline (never a bare sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def redis_url_for_tests() -> str:
    """This test session's own Redis (see _session_redis_url), emptied first."""
    import redis

    url = _session_redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
        available = True
    except redis.RedisError:
        available = False
    require_service("Redis", available, url)
    return url


def _session_redis_url() -> str:
    """A redis-server of this test session's own, on a free port, started on first use and
    stopped when the session ends: two sessions on one machine (two CI runs on one host)
    never see each other's messages, and flushing it can touch nobody else's data.

    Kept in the environment under this process's id because this file is imported twice
    (as pytest's `conftest` and as `tests.conftest`); a child process never inherits it."""
    key = f"BACKDROP_TEST_REDIS_URL_{os.getpid()}"
    if key not in os.environ:
        os.environ[key] = _start_session_redis()
    return os.environ[key]


def _start_session_redis() -> str:
    import atexit
    import shutil
    import subprocess
    import tempfile

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    if shutil.which("redis-server") is None:
        return url  # nothing answers there: require_service reports it
    folder = tempfile.mkdtemp(prefix="backdrop-test-redis-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
         "--save", "", "--appendonly", "no", "--logfile", f"{folder}/redis.log"],
        preexec_fn=_die_with_parent,
    )  # fmt: skip

    def stop() -> None:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    poll_until(
        lambda: server.poll() is not None or _answers_redis(url),
        timeout=20,
        what=f"the session's Redis at {url}",
    )
    return url  # if it exited at start, nothing answers there: require_service reports it


def _answers_redis(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even killed (atexit
    does not run then), so no server outlives its session."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def __getattr__(name: str) -> str:
    # REDIS_TEST_URL resolves on first import of the name, so a session that never needs
    # Redis never starts one.
    if name == "REDIS_TEST_URL":
        return _session_redis_url()
    raise AttributeError(name)


@pytest.fixture(scope="session")
def mobilenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DeepLabV3-MobileNetV3 state dict, shaped like the published file, whose
    masks vary with the photo and the classes (see tests/support/weights.py): with plain random init
    every mask is one constant, and no test through a worker could see refinement or class
    selection fail."""
    from tests.support.weights import save_varying_mobilenet

    folder = tmp_path_factory.mktemp("weights")
    return save_varying_mobilenet(folder / "deeplabv3_mobilenet_v3_large-random.pth")


# --- S3: moto's server as a real HTTP endpoint on loopback ------------------------------

# Dummy credentials: moto accepts any, and a real profile on the machine must never be used.
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers_http(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # an error status is still an answer
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the endpoint URL of a moto S3 server subprocess; AWS creds are set for the
    session. A subprocess (a Celery worker) gets the same via the `s3_env` fixture."""
    import subprocess
    import sys

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        poll_until(
            lambda: server.poll() is not None or _answers_http(endpoint),
            timeout=30,
            what=f"moto S3 server at {endpoint}",
        )
        if server.poll() is not None:
            pytest.fail(f"moto server exited at start:\n{log_path.read_text()[-2000:]}")
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                env.delenv(name, raising=False)
            for name, value in S3_TEST_CREDENTIALS.items():
                env.setenv(name, value)
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def s3_env(s3_server: str) -> dict[str, str]:
    """Environment for a subprocess that must reach the test S3 endpoint (merge into os.environ)."""
    return {**S3_TEST_CREDENTIALS, "BACKDROP_S3_ENDPOINT_URL": s3_server}


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named, empty bucket on the test S3 endpoint."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client(
        "s3", endpoint_url=s3_server, region_name="us-east-1"
    ).create_bucket(Bucket=name)
    return name


# --- jobs driven through the worker's transitions, without a worker -----------------------


def run_to_end(
    url: str,
    job_id: str,
    *,
    worker: str = "worker-test",
    error: tuple[str, str] | None = None,
    timings_ms: dict[str, float] | None = None,
    input_size: tuple[int, int] = (8, 8),
) -> None:
    """Start a queued job and finish it: succeeded, or failed with `error` (code, message)."""
    from producer import jobs
    from producer.db import session_scope

    with session_scope(url) as session:
        attempt = jobs.start(session, job_id, worker, 60).attempts
    with session_scope(url) as session:
        if error:
            jobs.fail(session, job_id, attempt, *error)
        else:
            jobs.succeed(
                session,
                job_id,
                attempt,
                model_name="deeplabv3_resnet101",
                model_weights="w",
                timings_ms=timings_ms or {},
                input_size=input_size,
                foreground_fraction=0.5,
            )


# --- callbacks: a real HTTP receiver on loopback ----------------------------------------

CALLBACK_SECRET = "test-callback-secret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real HTTP server on 127.0.0.1 recording the callbacks it gets (support/receiver.py)."""
    from tests.support.receiver import Receiver

    server = Receiver().start()
    yield server
    server.close()


@pytest.fixture
def callback_settings(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> Settings:
    """This process's settings: a callback secret, the receiver's host:port allowed, short
    per-attempt limits."""
    from producer import settings as settings_module

    settings = settings_module.Settings(
        callback_secret=CALLBACK_SECRET,
        callback_allowed_hosts=[receiver.host_port],
        callback_connect_timeout_s=2,
        callback_timeout_s=5,
    )
    monkeypatch.setattr(settings_module, "_current", settings)
    return settings
