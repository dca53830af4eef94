"""What a process talks to: its settings, its storage and its Celery app, held in one place.

The Client, the backfill engine and the API's app factory each take a `Services`, so they
share one S3 client and one broker connection pool instead of finding them each their own
way. Storage and the Celery app are built on first use: the CLI's `get` never needs a
broker, and the embedded default never needs S3.
"""

from __future__ import annotations

import threading

from celery import Celery

from producer import broker
from producer.settings import Settings, get_settings
from producer.storage import Storage


class Services:
    """Settings plus the storage and Celery app built from them (or given, as tests do)."""

    def __init__(
        self,
        settings: Settings,
        *,
        storage: Storage | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings
        self._storage = storage
        self._celery = celery
        self._lock = threading.Lock()

    @property
    def storage(self) -> Storage:
        with self._lock:
            if self._storage is None:
                self._storage = Storage(self.settings)
            return self._storage

    @property
    def celery(self) -> Celery:
        with self._lock:
            if self._celery is None:
                self._celery = broker.make_celery(self.settings)
            return self._celery


_default: Services | None = None
_default_lock = threading.Lock()


def default_services() -> Services:
    """This process's Services, built once from get_settings(); rebuilt only when
    `settings.configure()` has replaced the settings (the CLI does, first thing)."""
    global _default
    settings = get_settings()
    with _default_lock:
        if _default is None or _default.settings is not settings:
            _default = Services(settings)
        return _default
