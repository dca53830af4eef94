"""Shared fixtures: real photos, real services (skipped on a laptop, required in CI)."""

from __future__ import annotations

import os
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
