"""Services: one place a process finds its settings, storage and Celery app."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import settings as settings_module
from producer.services import Services, default_services
from producer.settings import Settings


def test_the_default_services_are_kept_until_the_settings_are_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(settings_module, "_current", Settings(data_dir=str(tmp_path)))
    first = default_services()
    assert default_services() is first
    assert first.storage is first.storage

    monkeypatch.setattr(settings_module, "_current", Settings(data_dir=str(tmp_path)))
    assert default_services() is not first


def test_storage_and_celery_given_to_services_are_used_as_they_are(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path))
    storage, celery = object(), object()
    services = Services(settings, storage=storage, celery=celery)  # type: ignore[arg-type]
    assert services.storage is storage
    assert services.celery is celery
