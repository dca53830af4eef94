"""Marketplace crops end to end: `backdrop process` with a known rectangle as its --mask, so
the subject's box is known to the pixel (the crop arithmetic itself: tests/test_crop.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from producer import settings as settings_module
from producer.cli import cli

SUBJECT = (150, 100, 250, 180)  # left, top, right, bottom: a 100×80 box
PHOTO_SIZE = (400, 300)
RED = (220, 40, 30)
BLUE = (40, 90, 160)


@pytest.fixture
def photo_and_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A blue photo with a red rectangle, and the rectangle's mask; settings restored after."""
    monkeypatch.setattr(settings_module, "_current", settings_module._current)
    monkeypatch.setenv("BACKDROP_DATA_DIR", str(tmp_path / "data"))
    left, top, right, bottom = SUBJECT
    pixels = np.full((PHOTO_SIZE[1], PHOTO_SIZE[0], 3), BLUE, np.uint8)
    pixels[top:bottom, left:right] = RED
    alpha = np.zeros(pixels.shape[:2], np.uint8)
    alpha[top:bottom, left:right] = 255
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    Image.fromarray(alpha).save(tmp_path / "mask.png")
    return tmp_path / "photo.png", tmp_path / "mask.png"


def process(photo: Path, mask: Path, output: Path, *flags: str) -> Image.Image:
    args = ["process", str(photo), str(output), "--mask", str(mask), *flags]
    finished = CliRunner().invoke(cli, args)
    assert finished.exit_code == 0, finished.output
    return Image.open(io.BytesIO(output.read_bytes()))


def red_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box of the (clearly) red pixels: where the subject landed."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    red = (rgb[:, :, 0] > 150) & (rgb[:, :, 2] < 100)
    rows, columns = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def test_crop_subject_is_the_box_plus_its_margin_of_the_longer_side(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    out = process(*photo_and_mask, tmp_path / "out.png", "--crop", "subject", "--margin", "0.1")
    # 10% of the box's longer side (100) on every side: (100 + 20) × (80 + 20).
    assert out.size == (120, 100)
    assert red_box(out) == (10, 10, 110, 90)


def test_a_margin_past_the_frame_is_clipped_to_the_photo(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    out = process(*photo_and_mask, tmp_path / "out.png", "--crop", "subject", "--margin", "1")
    # 100 px each way reaches past the top (100 - 100 = 0 is the edge) and stays inside left.
    assert out.size == (300, 280)


def test_a_transparent_canvas_with_a_saved_mask_is_rgba_with_clear_corners_and_the_same_alpha(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    flags = ["--background", "transparent", "--size", "800x800"]
    saved = tmp_path / "mask-out.png"
    out = process(*photo_and_mask, tmp_path / "out.png", *flags, "--save-mask", str(saved))
    saved_mask = np.asarray(Image.open(saved))
    assert out.size == (800, 800) and out.mode == "RGBA"
    alpha = np.asarray(out)[:, :, 3]
    assert alpha[0, 0] == alpha[-1, -1] == alpha[0, -1] == alpha[-1, 0] == 0
    assert np.array_equal(saved_mask, alpha)
    # Never upscaled: the 400×300 photo sits centred, its subject at its own size.
    assert red_box(out) == (350, 350, 450, 430)


def test_a_black_jpeg_canvas_around_a_crop_has_black_corners(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    flags = ["--background", "#000000", "--crop", "subject", "--size", "300x300"]
    out = process(*photo_and_mask, tmp_path / "out.jpg", *flags)
    rgb = np.asarray(out).astype(int)
    assert out.format == "JPEG" and out.size == (300, 300)
    for corner in (rgb[0, 0], rgb[-1, -1], rgb[0, -1], rgb[-1, 0]):
        assert corner.max() <= 8
    # The box (100×80) plus 5% margin is 110×90, centred and not scaled up.
    left, top, right, bottom = red_box(out)
    assert abs((right - left) - 100) <= 2 and abs((bottom - top) - 80) <= 2
    assert abs((left + right) / 2 - 150) <= 1 and abs((top + bottom) / 2 - 150) <= 1


def test_a_canvas_larger_than_the_box_does_not_upscale_it(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    flags = ["--crop", "subject", "--margin", "0", "--size", "1000x1000"]
    out = process(*photo_and_mask, tmp_path / "out.png", *flags)
    assert out.size == (1000, 1000)
    assert red_box(out) == (450, 460, 550, 540)


@pytest.mark.parametrize(
    "effect_flags",
    [
        ["--effect", "remove"],
        ["--effect", "remove", "--background", "transparent"],
        ["--effect", "blur"],
        ["--effect", "desaturate"],
        ["--effect", "replace", "--background", "{tmp}/backdrop.png"],
    ],
)
def test_every_effect_cropped_to_the_subject_is_the_box_size(
    photo_and_mask: tuple[Path, Path], tmp_path: Path, effect_flags: list[str]
) -> None:
    Image.new("RGB", (64, 64), (0, 200, 0)).save(tmp_path / "backdrop.png")
    flags = [flag.format(tmp=tmp_path) for flag in effect_flags]
    out = process(
        *photo_and_mask, tmp_path / "out.png", *flags, "--crop", "subject", "--margin", "0"
    )
    assert out.size == (100, 80)


def test_an_empty_mask_fails_no_subject_by_default(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    photo, mask = photo_and_mask
    Image.new("L", PHOTO_SIZE, 0).save(mask)
    args = ["process", str(photo), str(tmp_path / "out.png"), "--mask", str(mask)]
    finished = CliRunner().invoke(cli, [*args, "--crop", "subject"])
    assert finished.exit_code == 1
    assert "no_subject: no subject" in finished.output
    assert not (tmp_path / "out.png").exists()


def test_an_empty_mask_kept_by_request_fits_the_whole_photo_into_the_canvas(
    photo_and_mask: tuple[Path, Path], tmp_path: Path
) -> None:
    photo, mask = photo_and_mask
    Image.new("L", PHOTO_SIZE, 0).save(mask)
    flags = ["--effect", "blur", "--no-fail-on-no-subject", "--crop", "subject"]
    out = process(photo, mask, tmp_path / "out.png", *flags, "--size", "200x200")
    rgb = np.asarray(out).astype(int)
    # 400×300 scaled to 200×150, centred: white fill above and below, the blurred photo between.
    assert out.size == (200, 200)
    assert (rgb[10] == 255).all() and (rgb[-10] == 255).all()
    assert np.abs(rgb[40, 100] - BLUE).max() <= 30 and np.abs(rgb[100, 100] - RED).max() <= 30
