"""Shared fixtures: real photos, real services (skipped on a laptop, required in CI)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.postgres import fresh_database, postgres_reachable
from tests.support.receiver import CALLBACK_SECRET
from tests.support.required import require_service
from tests.support.services import S3_TEST_CREDENTIALS, MotoServer

if TYPE_CHECKING:
    from producer.settings import Settings
    from tests.support.receiver import Receiver

SKIMAGE_DATA = Path(__import__("skimage").data.__file__).parent
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "motorcycle_left")


@pytest.fixture(scope="session")
def photo_paths() -> dict[str, Path]:
    """Real photographs that scikit-image ships as files."""
    return {name: SKIMAGE_DATA / f"{name}.png" for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def photo_bytes(photo_paths: dict[str, Path]) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in photo_paths.items()}


# --- databases ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    require_service("PostgreSQL", postgres_reachable(), "127.0.0.1:5432")
    with fresh_database() as url:
        yield url


def _migrated_sqlite(folder: Path) -> str:
    from producer.db import upgrade

    url = f"sqlite:///{folder / 'jobs.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each job-store test runs on both databases; PostgreSQL tables are emptied per test."""
    if request.param == "sqlite":
        yield _migrated_sqlite(tmp_path)
        return
    from sqlalchemy import text

    from producer.db import get_engine

    url = request.getfixturevalue("postgres_url")
    # Emptied before as well as after: tests that use postgres_url directly leave rows behind.
    empty = text("TRUNCATE jobs, backfills, callback_attempts CASCADE")
    with get_engine(url).begin() as connection:
        connection.execute(empty)
    yield url
    with get_engine(url).begin() as connection:
        connection.execute(empty)


@pytest.fixture(params=["sqlite", "postgresql"])
def own_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of the test's own on each backend, for tests that migrate it."""
    if request.param == "sqlite":
        yield _migrated_sqlite(tmp_path)
        return
    require_service("PostgreSQL", postgres_reachable(), "127.0.0.1:5432")
    with fresh_database() as url:
        yield url


# --- model weights -----------------------------------------------------------------


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the endpoint URL of a moto S3 server subprocess; AWS creds are set for the
    session. A subprocess (a Celery worker) gets the same via the `s3_env` fixture."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.start()
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                env.delenv(name, raising=False)
            for name, value in S3_TEST_CREDENTIALS.items():
                env.setenv(name, value)
            yield server.endpoint
    finally:
        server.stop()


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


# --- callbacks: a real HTTP receiver on loopback ----------------------------------------


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
