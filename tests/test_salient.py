"""Salient models (U²-Net, ISNet on onnxruntime): files, signature, preprocessing, batching."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from onnx import TensorProto
from PIL import Image

from producer.catalog import CLASS_AGNOSTIC, SalientName, refuse_classes
from producer.errors import InvalidRequest, WeightsUnavailable
from producer.settings import Settings
from tests.support.salient import save_standin
from worker import salient
from worker.salient import (
    SALIENT_MODELS,
    SalientSegmenter,
    check_salient_weights,
    open_session,
    postprocess,
    preprocess,
    providers_for,
    pull_salient,
    resolve_salient_weights,
)

U2NET_SPEC = SALIENT_MODELS["u2net"]
ISNET_SPEC = SALIENT_MODELS["isnet-general-use"]


@pytest.fixture
def checkpoints(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's cache pointed at an empty temporary folder; yields its checkpoints folder."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def segmenter(path: Path, name: str) -> SalientSegmenter:
    return SalientSegmenter(open_session(path, name), name=name, weights_id="test", path=path)


def product_photo(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A red product (rows, columns of `box`) on a light grey backdrop."""
    photo = np.full((height, width, 3), 200, np.uint8)
    top, bottom, left, right = box
    photo[top:bottom, left:right] = (210, 30, 30)
    return photo


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def pinned_to(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> None:
    """The model's pin and location replaced by the stand-in's, as if it were the published
    file (a file:// URI: the download path without the network)."""
    spec = replace(SALIENT_MODELS[name], md5=md5(path), url=path.as_uri())
    monkeypatch.setitem(SALIENT_MODELS, name, spec)


class CountingSession:
    """An onnxruntime session that counts its calls and the photos in each."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        (batch,) = feeds.values()
        self.calls.append(len(batch))
        return self.inner.run(outputs, feeds)


# --- the registry ----------------------------------------------------------------------------


def test_every_salient_name_settings_accept_has_a_published_file_and_no_other() -> None:
    assert list(SALIENT_MODELS) == list(get_args(SalientName))
    assert set(SALIENT_MODELS) == CLASS_AGNOSTIC
    assert Settings(model="isnet-general-use").model == "isnet-general-use"


def test_classes_are_refused_for_a_class_agnostic_model_only() -> None:
    with pytest.raises(InvalidRequest, match="BACKDROP_MODEL=u2net marks the photo's salient"):
        refuse_classes(["person"], "u2net")
    refuse_classes(None, "u2net")
    refuse_classes(["person"], "deeplabv3_resnet50")


# --- preprocessing and postprocessing ------------------------------------------------------


def test_preprocessing_squashes_to_the_square_input_and_scales_by_the_brightest_pixel() -> None:
    # rembg divides by the photo's own maximum, not by 255: a dim uniform photo reads as white.
    dim = np.full((30, 50, 3), 100, np.uint8)
    tensor = preprocess(dim, U2NET_SPEC)
    assert tensor.shape == (3, 320, 320)
    assert tensor.dtype == np.float32
    expected = (1.0 - np.array(U2NET_SPEC.mean)) / np.array(U2NET_SPEC.std)
    np.testing.assert_allclose(tensor.mean(axis=(1, 2)), expected, rtol=1e-6)


def test_isnet_normalises_around_a_half_with_unit_spread_at_1024() -> None:
    photo = np.zeros((20, 10, 3), np.uint8)
    photo[:, :5] = 255
    tensor = preprocess(photo, ISNET_SPEC)
    assert tensor.shape == (3, 1024, 1024)
    assert tensor.min() == pytest.approx(-0.5, abs=0.02)
    assert tensor.max() == pytest.approx(0.5, abs=0.02)


def test_preprocessing_resizes_with_pils_lanczos_as_rembg_does() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (77, 131, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(photo).resize((320, 320), Image.Resampling.LANCZOS))
    expected = (resized / resized.max() - np.array(U2NET_SPEC.mean)) / np.array(U2NET_SPEC.std)
    np.testing.assert_allclose(
        preprocess(photo, U2NET_SPEC), expected.transpose(2, 0, 1), atol=1e-6
    )


def test_postprocessing_stretches_each_map_to_zero_and_one_at_the_photos_aspect() -> None:
    raw = np.linspace(0.2, 0.6, 320 * 320, dtype=np.float32).reshape(320, 320)
    fitted = postprocess(raw, (600, 800), 320)
    assert fitted.shape == (240, 320)
    assert fitted.min() == pytest.approx(0.0, abs=1e-3)
    assert fitted.max() == pytest.approx(1.0, abs=1e-3)


def test_a_flat_map_keeps_its_level_instead_of_dividing_by_zero() -> None:
    fitted = postprocess(np.full((320, 320), 0.25, np.float32), (100, 100), 320)
    assert np.all(np.isfinite(fitted))
    np.testing.assert_allclose(fitted, 0.25)


# --- predicting ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SALIENT_MODELS))
def test_the_map_marks_the_product_whatever_its_class(name: str, tmp_path: Path) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", name), name)
    photo = product_photo(300, 400, (100, 200, 150, 250))
    (found,) = model.predict([photo], [[]])
    side = SALIENT_MODELS[name].input_size
    assert found.shape == (side * 3 // 4, side)
    assert found.dtype == np.float32
    scale = side / 400
    assert found[round(150 * scale), round(200 * scale)] > 0.9
    # Not 0: Lanczos rings darker than the backdrop beside the product's edge.
    assert found[round(20 * scale), round(20 * scale)] < 0.3


def test_a_dynamic_batch_runs_in_one_call_whatever_the_photos_sizes(tmp_path: Path) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", "u2netp", batch="batch"), "u2netp")
    assert model.signature.batched
    counting = CountingSession(model._session)
    model._session = counting
    photos = [
        product_photo(300, 400, (100, 200, 150, 250)),
        product_photo(500, 200, (0, 250, 0, 200)),
        product_photo(64, 64, (10, 20, 10, 20)),
    ]
    together = model.predict(photos, [[], [], []])
    assert counting.calls == [3]
    alone = [model.predict([photo], [[]])[0] for photo in photos]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)  # min-max per photo, not per batch
    assert [m.shape for m in together] == [(240, 320), (320, 128), (320, 320)]


def test_a_file_with_a_batch_of_one_runs_photo_by_photo(tmp_path: Path) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", "u2net", batch=1), "u2net")
    assert not model.signature.batched
    counting = CountingSession(model._session)
    model._session = counting
    model.predict([product_photo(40, 40, (0, 20, 0, 20))] * 2, [[], []])
    assert counting.calls == [1, 1]


def test_only_the_first_output_is_read(tmp_path: Path) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", "u2net"), "u2net")
    assert model.signature.output_name == "d0"


def test_bad_images_are_refused_before_the_model_runs(tmp_path: Path) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", "u2netp"), "u2netp")
    with pytest.raises(ValueError, match="uint8"):
        model.predict([np.zeros((4, 4, 3), np.float32)], [[]])
    with pytest.raises(ValueError, match="class lists"):
        model.predict([np.zeros((4, 4, 3), np.uint8)], [])
    assert model.predict([], []) == []


# --- the file's signature ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SALIENT_MODELS))
def test_a_file_with_the_published_signature_passes_the_check(name: str, tmp_path: Path) -> None:
    check_salient_weights(name, save_standin(tmp_path / "m.onnx", name))


def test_isnets_file_for_u2net_is_refused_with_the_model_it_fits(tmp_path: Path) -> None:
    path = save_standin(tmp_path / "isnet.onnx", "isnet-general-use")
    with pytest.raises(WeightsUnavailable) as refused:
        check_salient_weights("u2net", path)
    message = str(refused.value)
    assert "(batch, 3, 1024, 1024)" in message
    assert "BACKDROP_MODEL=isnet-general-use" in message
    assert "BACKDROP_WEIGHTS" in message


@pytest.mark.parametrize(
    ("misfit", "shown"),
    [
        ({"channels": 4}, "(batch, 4, 320, 320)"),
        ({"input_type": TensorProto.UINT8}, "tensor(uint8)"),
        ({"batch": 4}, "(4, 3, 320, 320)"),
    ],
)
def test_a_file_of_another_signature_is_refused_naming_what_it_has(
    misfit: dict[str, Any], shown: str, tmp_path: Path
) -> None:
    path = save_standin(tmp_path / "m.onnx", "u2netp", **misfit)
    with pytest.raises(WeightsUnavailable, match="does not fit u2netp") as refused:
        check_salient_weights("u2netp", path)
    assert shown in str(refused.value)
    assert "(N, 3, 320, 320)" in str(refused.value)


def test_a_file_that_is_not_onnx_is_refused_with_the_published_location(tmp_path: Path) -> None:
    path = tmp_path / "u2net.pth"
    path.write_bytes(b"not a model")
    with pytest.raises(WeightsUnavailable, match="not a readable ONNX model") as refused:
        check_salient_weights("u2net", path)
    assert U2NET_SPEC.url in str(refused.value)


# --- weights: configured, cached, downloaded, pinned ---------------------------------------


def test_every_file_is_pinned_to_rembgs_published_release() -> None:
    for name, spec in SALIENT_MODELS.items():
        assert spec.url.startswith("https://github.com/danielgatis/rembg/releases/download/")
        assert spec.file_name == f"{name}.onnx"
        assert len(spec.md5) == 32


def test_a_configured_file_of_another_name_is_the_operators_own_export(
    tmp_path: Path, checkpoints: Path
) -> None:
    path = save_standin(tmp_path / "my-u2net-export.onnx", "u2net")
    assert resolve_salient_weights("u2net", str(path), allow_download=False) == path


def test_a_configured_file_with_the_published_name_must_have_the_published_md5(
    tmp_path: Path, checkpoints: Path
) -> None:
    path = save_standin(tmp_path / "u2net.onnx", "u2net")
    with pytest.raises(WeightsUnavailable, match=f"not the published {U2NET_SPEC.md5}"):
        resolve_salient_weights("u2net", str(path), allow_download=False)


def test_a_cached_file_is_verified_against_the_pin(
    tmp_path: Path, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints.mkdir(parents=True)
    cached = save_standin(checkpoints / "u2netp.onnx", "u2netp")
    with pytest.raises(WeightsUnavailable, match="corrupt or another one"):
        resolve_salient_weights("u2netp", None, allow_download=False)
    pinned_to(monkeypatch, "u2netp", cached)
    assert resolve_salient_weights("u2netp", None, allow_download=False) == cached


def test_without_the_file_or_a_download_the_message_says_how_to_get_it(checkpoints: Path) -> None:
    with pytest.raises(WeightsUnavailable) as refused:
        resolve_salient_weights("isnet-general-use", None, allow_download=False)
    message = str(refused.value)
    assert ISNET_SPEC.url in message
    assert str(checkpoints) in message
    assert "BACKDROP_WEIGHTS=/path/isnet-general-use.onnx" in message


def test_a_download_is_cached_only_when_its_md5_is_the_pinned_one(
    tmp_path: Path, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mirror").mkdir()
    published = save_standin(tmp_path / "mirror" / "u2netp.onnx", "u2netp")
    tampered = save_standin(tmp_path / "tampered.onnx", "u2netp", weights=(1.0, 1.0, 1.0))
    pinned_to(monkeypatch, "u2netp", published)
    with pytest.raises(WeightsUnavailable, match="refused the download"):
        resolve_salient_weights("u2netp", None, url=tampered.as_uri())
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    path = resolve_salient_weights("u2netp", None)  # the pinned url: the stand-in's file:// URI
    assert path == checkpoints / "u2netp.onnx"
    assert md5(path) == md5(published)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["u2netp.onnx"]


def test_pull_downloads_verifies_and_pushes_under_the_published_name(
    tmp_path: Path, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mirror").mkdir()
    published = save_standin(tmp_path / "mirror" / "isnet-general-use.onnx", "isnet-general-use")
    pinned_to(monkeypatch, "isnet-general-use", published)
    uploads: list[tuple[Path, str]] = []
    pulled = pull_salient(
        "isnet-general-use",
        "s3://models/backdrop/",
        upload=lambda path, location: uploads.append((path, location)),
    )
    assert pulled.sha256 == hashlib.sha256(published.read_bytes()).hexdigest()
    assert pulled.pushed_to == "s3://models/backdrop/isnet-general-use.onnx"
    assert uploads == [(checkpoints / "isnet-general-use.onnx", pulled.pushed_to)]


def test_loading_names_the_exact_file_it_runs(
    tmp_path: Path, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_standin(tmp_path / "export.onnx", "u2netp")
    model = SalientSegmenter.load("u2netp", weights=str(path), device="cpu")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.weights_id == f"export.onnx@sha256:{digest[:12]}"
    assert model.device == torch.device("cpu")


# --- devices -------------------------------------------------------------------------------


def test_cuda_asked_of_a_cpu_build_of_onnxruntime_says_which_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(WeightsUnavailable, match="install onnxruntime-gpu"):
        providers_for("cuda")
    assert providers_for("auto") == ["CPUExecutionProvider"]


def test_auto_prefers_cuda_where_onnxruntime_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert providers_for("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_the_module_imports_no_onnxruntime_until_a_model_is_opened() -> None:
    # The producer and a DeepLab-only worker never install it.
    assert "onnxruntime" not in vars(salient)


def test_a_worker_warns_once_that_it_ignores_a_jobs_classes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = segmenter(save_standin(tmp_path / "m.onnx", "u2netp"), "u2netp")
    photo = product_photo(40, 40, (0, 20, 0, 20))
    every = list(range(1, 21))  # what a job without classes selects
    model.predict([photo], [every])
    assert "ignored" not in caplog.text
    first, again = model.predict([photo], [[15]]), model.predict([photo], [[15]])
    np.testing.assert_array_equal(first[0], again[0])
    assert caplog.text.count("u2netp knows no classes: jobs' classes are ignored") == 1


def test_a_worker_without_onnxruntime_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_standin(tmp_path / "m.onnx", "u2netp")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(WeightsUnavailable, match=r"pip install 'backdrop\[worker,onnx\]'"):
        check_salient_weights("u2netp", path)
