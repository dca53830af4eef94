"""`backdrop models pull`: verified weights for offline clusters, and verified fetches of them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from producer.errors import WeightsUnavailable
from worker.weights import MODELS, pull, resolve_weights

MOBILENET = "deeplabv3_mobilenet_v3_large"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's cache pointed at an empty temporary folder; yields its checkpoints folder."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def published_style(folder: Path, content: bytes, prefix: str | None = None) -> Path:
    """A file named like torchvision's `<model>-<sha256 prefix>.pth` (or a wrong prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(content).hexdigest()
    path = folder / f"{MOBILENET}-{prefix or digest[:8]}.pth"
    path.write_bytes(content)
    return path


def test_pull_downloads_verifies_and_pushes_under_the_published_name(
    tmp_path: Path, checkpoints: Path
) -> None:
    mirror = published_style(tmp_path / "mirror", b"weights bytes")
    uploads: list[tuple[Path, str]] = []

    pulled = pull(
        MOBILENET,
        "s3://models/backdrop/",
        upload=lambda path, location: uploads.append((path, location)),
        url=mirror.as_uri(),
    )

    assert pulled.path == checkpoints / mirror.name
    assert pulled.sha256 == hashlib.sha256(b"weights bytes").hexdigest()
    assert pulled.pushed_to == f"s3://models/backdrop/{mirror.name}"
    assert uploads == [(pulled.path, pulled.pushed_to)]


def test_pull_without_push_uploads_nothing(tmp_path: Path, checkpoints: Path) -> None:
    mirror = published_style(tmp_path / "mirror", b"weights bytes")
    pulled = pull(MOBILENET, None, upload=lambda *_: pytest.fail("uploaded"), url=mirror.as_uri())
    assert pulled.pushed_to is None
    assert pulled.path.is_file()


def test_pull_refuses_a_cached_file_that_is_not_the_published_one(checkpoints: Path) -> None:
    name = MODELS[MOBILENET].file_name
    (checkpoints / name).parent.mkdir(parents=True)
    (checkpoints / name).write_bytes(b"not the published weights")
    with pytest.raises(WeightsUnavailable, match="does not start with"):
        pull(MOBILENET, "s3://models/backdrop", upload=lambda *_: pytest.fail("pushed"))


def test_the_cli_reports_a_refused_pull_as_one_line_with_the_error_code(
    checkpoints: Path,
) -> None:
    from producer.cli import cli

    name = MODELS[MOBILENET].file_name
    (checkpoints / name).parent.mkdir(parents=True)
    (checkpoints / name).write_bytes(b"tampered")
    result = CliRunner().invoke(cli, ["models", "pull", "--model", MOBILENET])
    assert result.exit_code != 0
    assert result.output.strip().startswith("weights_unavailable: ")


def test_fetched_weights_whose_name_promises_another_hash_are_refused_and_not_cached(
    tmp_path: Path, checkpoints: Path
) -> None:
    def fetch(location: str, path: Path) -> None:
        path.write_bytes(b"tampered in the bucket")

    location = f"s3://models/backdrop/{MOBILENET}-0000aaaa.pth"
    with pytest.raises(WeightsUnavailable, match="does not start with 0000aaaa"):
        resolve_weights(MOBILENET, location, fetch=fetch)
    assert not [p for p in checkpoints.rglob("*") if p.is_file()]


def test_fetched_weights_with_the_promised_hash_are_cached_and_fetched_once(
    tmp_path: Path, checkpoints: Path
) -> None:
    pushed = published_style(tmp_path / "bucket", b"the published weights")
    fetched: list[str] = []

    def fetch(location: str, path: Path) -> None:
        fetched.append(location)
        path.write_bytes(pushed.read_bytes())

    location = f"s3://models/backdrop/{pushed.name}"
    first = resolve_weights(MOBILENET, location, fetch=fetch)
    second = resolve_weights(MOBILENET, location, fetch=fetch)
    assert first == second
    assert first.name == pushed.name
    assert first.read_bytes() == b"the published weights"
    assert fetched == [location]
