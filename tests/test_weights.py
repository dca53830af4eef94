"""Weights: where the state-dict file comes from, how it is loaded, and how it is named."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from producer.catalog import DeepLabName
from producer.errors import InputNotFound, StorageUnavailable, WeightsUnavailable
from worker.weights import MODELS, check_weights, load_model, resolve_weights, weights_identity

MOBILENET = "deeplabv3_mobilenet_v3_large"
PUBLISHED_MOBILENET_FILE = "deeplabv3_mobilenet_v3_large-fc3c493d.pth"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's cache pointed at an empty temporary folder; yields its checkpoints folder."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


@pytest.fixture(scope="module")
def mobilenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True)
    return model.state_dict()


def save(state: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def without_aux(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}


def named_by_hash(state: dict[str, torch.Tensor], folder: Path, prefix: str | None = None) -> Path:
    """A file named like torchvision's: `<model>-<sha256 prefix>.pth` (or a wrong prefix)."""
    scratch = save(state, folder / "scratch.pth")
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    return scratch.rename(folder / f"{MOBILENET}-{prefix or digest[:8]}.pth")


# --- loading -------------------------------------------------------------------------------


def test_every_deeplab_model_settings_accept_has_an_architecture_and_no_other() -> None:
    assert list(MODELS) == list(get_args(DeepLabName))


def test_a_published_style_file_loads_strictly_and_the_aux_head_is_dropped(
    mobilenet_weights: Path,
) -> None:
    model = load_model(MOBILENET, mobilenet_weights)
    saved = torch.load(mobilenet_weights, weights_only=True)
    assert model.aux_classifier is None
    assert not model.training
    assert torch.equal(model.classifier[4].weight, saved["classifier.4.weight"])


def test_a_fine_tuned_file_without_the_aux_head_loads_too(
    mobilenet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save(without_aux(mobilenet_state), tmp_path / "tuned.pth")
    model = load_model(MOBILENET, path)
    assert torch.equal(model.classifier[4].bias, mobilenet_state["classifier.4.bias"])


def test_a_training_checkpoint_wrapping_the_state_dict_loads(
    mobilenet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save({"state_dict": mobilenet_state, "epoch": 3}, tmp_path / "checkpoint.pth")
    model = load_model(MOBILENET, path)
    assert torch.equal(model.classifier[4].bias, mobilenet_state["classifier.4.bias"])


def test_a_file_of_another_architecture_is_refused_naming_the_model_it_fits(
    mobilenet_weights: Path,
) -> None:
    with pytest.raises(WeightsUnavailable) as refused:
        load_model("deeplabv3_resnet50", mobilenet_weights)
    message = str(refused.value)
    assert mobilenet_weights.name in message
    assert "the model is deeplabv3_resnet50" in message
    assert f"set BACKDROP_MODEL={MOBILENET}" in message


def test_the_weights_check_refuses_another_architecture_before_any_job(
    mobilenet_weights: Path,
) -> None:
    with pytest.raises(WeightsUnavailable, match=f"BACKDROP_MODEL={MOBILENET}"):
        check_weights("deeplabv3_resnet101", mobilenet_weights)


def test_the_weights_check_passes_a_file_that_fits(mobilenet_weights: Path) -> None:
    check_weights(MOBILENET, mobilenet_weights)


def test_the_weights_check_names_the_mismatch_when_no_model_fits(tmp_path: Path) -> None:
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2)
    path = save(model.state_dict(), tmp_path / "two-classes.pth")
    with pytest.raises(WeightsUnavailable, match="shape mismatches"):
        check_weights(MOBILENET, path)


def test_a_file_with_another_number_of_classes_is_refused(tmp_path: Path) -> None:
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2)
    path = save(model.state_dict(), tmp_path / "two-classes.pth")
    with pytest.raises(WeightsUnavailable, match="shape mismatches"):
        load_model(MOBILENET, path)


def test_a_garbage_file_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsUnavailable, match=r"garbage\.pth is not a readable PyTorch state"):
        load_model(MOBILENET, path)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(WeightsUnavailable, match="not a state dict"):
        load_model(MOBILENET, path)


def test_an_unknown_model_name_is_refused() -> None:
    with pytest.raises(WeightsUnavailable, match="unknown model"):
        resolve_weights("deeplabv3_vgg", None, allow_download=False)


# --- resolving -----------------------------------------------------------------------------


def test_a_configured_file_beats_the_cache(
    mobilenet_weights: Path, checkpoints: Path, tmp_path: Path
) -> None:
    save({"x": torch.zeros(1)}, checkpoints / PUBLISHED_MOBILENET_FILE)
    assert resolve_weights(MOBILENET, str(mobilenet_weights)) == mobilenet_weights
    assert resolve_weights(MOBILENET, mobilenet_weights.as_uri()) == mobilenet_weights


def test_the_cache_is_used_when_nothing_is_configured(checkpoints: Path) -> None:
    cached = save({"x": torch.zeros(1)}, checkpoints / PUBLISHED_MOBILENET_FILE)
    assert resolve_weights(MOBILENET, None, allow_download=False) == cached


def test_a_configured_file_that_does_not_exist_is_an_error_not_a_fallback(
    checkpoints: Path, tmp_path: Path
) -> None:
    save({"x": torch.zeros(1)}, checkpoints / PUBLISHED_MOBILENET_FILE)
    with pytest.raises(WeightsUnavailable, match=r"BACKDROP_WEIGHTS=.*missing\.pth is not a file"):
        resolve_weights(MOBILENET, str(tmp_path / "missing.pth"))


def test_a_remote_location_is_fetched_once_into_the_cache(
    mobilenet_weights: Path, checkpoints: Path
) -> None:
    fetched: list[str] = []

    def fetch(location: str, path: Path) -> None:
        fetched.append(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mobilenet_weights.read_bytes())

    location = "s3://models/backdrop/tuned.pth"
    first = resolve_weights(MOBILENET, location, fetch=fetch)
    second = resolve_weights(MOBILENET, location, fetch=fetch)
    assert first == second
    assert first.is_relative_to(checkpoints)
    assert first.read_bytes() == mobilenet_weights.read_bytes()
    assert fetched == [location]


def test_a_remote_location_that_cannot_be_fetched_is_refused_naming_it(checkpoints: Path) -> None:
    def fetch(location: str, path: Path) -> None:
        raise InputNotFound(f"{location} does not exist")

    with pytest.raises(WeightsUnavailable, match=re.escape("s3://models/gone.pth")):
        resolve_weights(MOBILENET, "s3://models/gone.pth", fetch=fetch)


def test_an_unreachable_store_stays_a_transient_error(checkpoints: Path) -> None:
    def fetch(location: str, path: Path) -> None:
        raise StorageUnavailable("connection refused")

    with pytest.raises(StorageUnavailable):
        resolve_weights(MOBILENET, "s3://models/tuned.pth", fetch=fetch)


def test_a_remote_location_without_a_fetcher_is_refused(checkpoints: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="no storage is configured"):
        resolve_weights(MOBILENET, "s3://models/tuned.pth")


def test_a_download_with_the_right_hash_lands_in_the_cache(
    mobilenet_state: dict[str, torch.Tensor], checkpoints: Path, tmp_path: Path
) -> None:
    published = named_by_hash(mobilenet_state, tmp_path / "mirror")
    path = resolve_weights(MOBILENET, None, url=published.as_uri())
    assert path == checkpoints / published.name
    assert path.read_bytes() == published.read_bytes()
    assert sorted(p.name for p in checkpoints.iterdir()) == [published.name]
    # Later lookups find it without downloading.
    missing_url = (tmp_path / "elsewhere" / published.name).as_uri()
    assert resolve_weights(MOBILENET, None, url=missing_url) == path


def test_a_download_with_the_wrong_hash_is_refused_and_not_cached(
    mobilenet_state: dict[str, torch.Tensor], checkpoints: Path, tmp_path: Path
) -> None:
    tampered = named_by_hash(mobilenet_state, tmp_path / "mirror", prefix="00000000")
    with pytest.raises(WeightsUnavailable, match=r"refused the download.*sha256"):
        resolve_weights(MOBILENET, None, url=tampered.as_uri())
    assert list(checkpoints.iterdir()) == []


def test_with_nothing_anywhere_the_message_says_what_to_do(checkpoints: Path) -> None:
    with pytest.raises(WeightsUnavailable) as refused:
        resolve_weights(MOBILENET, None, allow_download=False)
    message = str(refused.value)
    assert PUBLISHED_MOBILENET_FILE in message
    assert str(checkpoints) in message
    assert "BACKDROP_WEIGHTS=" in message
    assert "internet" in message


def test_a_failed_download_gives_the_same_actionable_message(
    checkpoints: Path, tmp_path: Path
) -> None:
    unreachable = (tmp_path / "offline" / PUBLISHED_MOBILENET_FILE).as_uri()
    with pytest.raises(WeightsUnavailable) as refused:
        resolve_weights(MOBILENET, None, url=unreachable)
    message = str(refused.value)
    assert "download failed" in message
    assert str(checkpoints) in message
    assert "BACKDROP_WEIGHTS=" in message
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


# --- identity ------------------------------------------------------------------------------


def test_the_identity_names_the_file_and_its_content(
    mobilenet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save(mobilenet_state, tmp_path / "tuned.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights_identity(path) == f"tuned.pth@sha256:{digest[:12]}"
    assert weights_identity(path) == weights_identity(path)

    save(without_aux(mobilenet_state), path)
    assert weights_identity(path) != f"tuned.pth@sha256:{digest[:12]}"


@pytest.mark.parametrize("command", [["worker"], ["demo"]])
def test_a_worker_or_demo_with_weights_of_another_model_stops_before_taking_any_job(
    command: list[str], mobilenet_weights: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BACKDROP_DATA_DIR": str(tmp_path / "data"),
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
    }
    env.pop("BACKDROP_MODEL", None)
    finished = subprocess.run(
        [sys.executable, "-m", "producer.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert finished.returncode != 0
    assert finished.stderr.strip().splitlines()[-1].startswith("weights_unavailable: ")
    assert f"set BACKDROP_MODEL={MOBILENET}" in finished.stderr
    # Nothing was started or uploaded: the demo's inputs and outputs were never created.
    assert not (tmp_path / "data" / "inputs").exists()
    assert not (tmp_path / "demo-output").exists()
