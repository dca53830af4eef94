"""`backdrop process`'s engine: local photos through the workers' imaging path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import worker.local
from producer.errors import BackgroundNotFound
from producer.outputs import Pair
from producer.settings import Settings
from worker.imageio import decode_image
from worker.local import LocalProcessor

LIMITS = {"max_pixels": 10_000_000, "max_bytes": 10_000_000}


def encoded(fmt: str, colour: tuple[int, int, int] = (200, 40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_heic_and_avif_decode_to_their_size_and_colour(fmt: str) -> None:
    decoded = decode_image(encoded(fmt), **LIMITS)
    assert decoded.rgb.shape == (48, 64, 3) and decoded.source_format == fmt
    assert np.abs(decoded.rgb.astype(int) - (200, 40, 30)).mean() < 12


@pytest.fixture
def settings(mobilenet_weights: Path, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        model="deeplabv3_mobilenet_v3_large",
        weights=str(mobilenet_weights),
        device="cpu",
        model_input_size=128,
    )


def test_many_photos_share_one_model_load(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []
    real_load = worker.local.load_segmenter

    def counted_load(settings: Settings, **kwargs: object) -> object:
        loads.append(settings)
        return real_load(settings, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.local, "load_segmenter", counted_load)
    pairs = []
    for i, fmt in enumerate(["JPEG", "PNG", "HEIF"]):
        source = tmp_path / f"{i}.{fmt.lower()}"
        source.write_bytes(encoded(fmt, (40 * i, 90, 160)))
        pairs.append(Pair(str(source), str(tmp_path / "out" / f"{i}.webp"), "webp"))

    processor = LocalProcessor(settings, {"effect": "blur"})
    for pair in pairs:
        processor.process(pair)

    assert len(loads) == 1
    assert [Image.open(pair.output).format for pair in pairs] == ["WEBP"] * 3


def test_a_missing_background_is_named_as_the_background(
    settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(encoded("PNG"))
    processor = LocalProcessor(
        settings, {"effect": "replace", "background": str(tmp_path / "gone.jpg")}
    )
    with pytest.raises(
        BackgroundNotFound, match=r"^background_not_found: background: .*gone\.jpg does not exist"
    ):
        processor.process(Pair(str(source), str(tmp_path / "out.png"), "png"))
