"""Test sessions are isolated from each other: two runs on one machine (two CI jobs on one
host) never share a broker, so neither can take or flush the other's messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.support.session_redis import redis_url_for_tests

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[1]
OTHER_SESSION = (
    "from tests.support.session_redis import redis_url_for_tests; print(redis_url_for_tests())"
)


def test_two_test_sessions_never_share_a_redis() -> None:
    ours = redis_url_for_tests()
    redis.Redis.from_url(ours).lpush("interactive", "a message of this session")

    other = subprocess.run(
        [sys.executable, "-c", OTHER_SESSION],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()

    assert other.startswith("redis://") and other != ours
    # The other session emptied its Redis when it began; this one still holds its message.
    assert redis.Redis.from_url(ours).llen("interactive") == 1
