"""Integration tests' services: skipped on a laptop without them, required in CI."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_service(name: str, available: bool, detail: str = "") -> None:
    """Skip a test whose service is missing on a laptop; fail it in CI, where it must run."""
    if available:
        return
    message = f"{name} is not reachable{': ' + detail if detail else ''}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: integration tests must not skip)")
    pytest.skip(message)
