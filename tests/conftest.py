"""Shared fixtures: real photos, real services (skipped on a laptop, required in CI)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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

REDIS_TEST_URL = "redis://127.0.0.1:6379/14"


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
    """A Redis database of its own for the tests, emptied first."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3)
    try:
        client.flushdb()
        available = True
    except redis.RedisError:
        available = False
    require_service("Redis", available, REDIS_TEST_URL)
    return REDIS_TEST_URL


@pytest.fixture(scope="session")
def mobilenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DeepLabV3-MobileNetV3 state dict, shaped like the published file."""
    import torch
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    path = tmp_path_factory.mktemp("weights") / "deeplabv3_mobilenet_v3_large-random.pth"
    torch.save(model.state_dict(), path)
    return path
