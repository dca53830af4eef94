"""Building the HTTP API over a real database and Redis: the settings and tokens its tests
(test_api, test_metrics, test_stats) share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI

from producer.api import create_app
from producer.broker import QUEUE_NAMES
from producer.services import Services
from producer.settings import Settings
from tests.support.required import require_service
from tests.support.session_redis import REDIS_TEST_URL

TOKEN = "alpha-token-0123456789abcdefghijklmnop"
OTHER_TOKEN = "beta-token-9876543210zyxwvutsrqponm"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def redis_broker_url() -> str:
    """The test Redis with its queues emptied. Deliberately no FLUSHDB: kombu remembers the
    exchange bindings it declared for the whole process, so after a flush every later publish
    from this process would be dropped (reported on producer/broker.py)."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3)
    try:
        client.delete(*QUEUE_NAMES)
        available = True
    except redis.RedisError:
        available = False
    require_service("Redis", available, REDIS_TEST_URL)
    return REDIS_TEST_URL


def api_settings(db_url: str, root: Path, **overrides: Any) -> Settings:
    """Settings of an API over `db_url` whose local photos live under `root`."""
    fields: dict[str, Any] = {
        "database_url": db_url,
        "broker_url": overrides.pop("broker_url", None) or redis_broker_url(),
        "data_dir": root.parent / "data",
        "local_roots": [str(root)],
        "output_prefix": (root / "out").as_uri(),
        "api_tokens": [TOKEN, OTHER_TOKEN],
    }
    return Settings(**(fields | overrides))


def api_app(settings: Settings) -> FastAPI:
    return create_app(Services(settings))


def location(root: Path, name: str = "cat.png") -> str:
    return (root / name).as_uri()
