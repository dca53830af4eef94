"""Foreground colour estimation, proved on composites of real photos with a known matte."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from producer.request import JobRequest
from worker import foreground
from worker.foreground import estimate_foreground
from worker.imageio import DecodedImage
from worker.pipeline import Timings, apply_effect, render

Composite = tuple[np.ndarray, np.ndarray, np.ndarray]


def soft_matte(width: int, height: int) -> np.ndarray:
    """A horse silhouette with a soft edge, plus hair-like strands of partial alpha."""
    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    matte = cv2.resize(horse, (width * 3 // 4, height * 3 // 4), interpolation=cv2.INTER_AREA)
    alpha = np.zeros((height, width), np.uint8)
    alpha[height // 8 : height // 8 + matte.shape[0], width // 8 : width // 8 + matte.shape[1]] = (
        matte
    )
    strands = np.zeros_like(alpha)
    rng = np.random.default_rng(5)
    for _ in range(40):
        start = rng.integers((width // 4, height // 4), (3 * width // 4, 3 * height // 4))
        end = start + rng.integers(-width // 6, width // 6, 2)
        cv2.line(strands, tuple(map(int, start)), tuple(map(int, end)), 255, 1, cv2.LINE_AA)
    return np.maximum(cv2.GaussianBlur(alpha, (0, 0), 1.5), strands)


def composite_of(front: np.ndarray, back: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(np.float64)[:, :, None] / 255
    return np.floor(front * weight + back * (1 - weight) + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_composite() -> Composite:
    """(photo, alpha, true foreground): the astronaut's colours over the coffee photo."""
    width, height = 640, 480
    front = cv2.resize(skimage.data.astronaut(), (width, height), interpolation=cv2.INTER_AREA)
    back = cv2.resize(skimage.data.coffee(), (width, height), interpolation=cv2.INTER_AREA)
    alpha = soft_matte(width, height)
    return composite_of(front, back, alpha), alpha, front


def edge_error(colours: np.ndarray, truth: np.ndarray, alpha: np.ndarray) -> float:
    """Mean |a·(F − F_true)| over the band: what a composite over anything new is off by."""
    band = (alpha > 0) & (alpha < 255)
    weight = alpha[band].astype(np.float64)[:, None] / 255
    return float(np.abs(weight * (colours[band].astype(np.float64) - truth[band])).mean())


def test_edge_colours_are_much_closer_to_the_subject_than_the_photos_own(photo_composite) -> None:
    photo, alpha, truth = photo_composite
    estimated = estimate_foreground(photo, alpha)
    # Measured ~0.4 here; the photo's own colours are 1.0 by definition.
    assert edge_error(estimated, truth, alpha) < 0.6 * edge_error(photo, truth, alpha)


def test_pixels_of_alpha_0_or_255_keep_the_photos_colours_exactly(photo_composite) -> None:
    photo, alpha, _ = photo_composite
    estimated = estimate_foreground(photo, alpha)
    hard = (alpha == 0) | (alpha == 255)
    assert estimated.shape == photo.shape and estimated.dtype == np.uint8
    assert np.array_equal(estimated[hard], photo[hard])
    assert not np.array_equal(estimated[~hard], photo[~hard])


def flat_composite() -> Composite:
    """A pure red subject (right half) over pure green, with a soft edge a few pixels wide."""
    red, green = np.array([200, 30, 30]), np.array([30, 160, 40])
    alpha = np.zeros((480, 640), np.uint8)
    alpha[:, 320:] = 255
    alpha = cv2.GaussianBlur(alpha, (0, 0), 2)
    front = np.broadcast_to(red, (480, 640, 3)).astype(np.uint8)
    return composite_of(front, green, alpha), alpha, front


def test_a_red_subjects_soft_edge_over_green_comes_out_red_not_olive() -> None:
    photo, alpha, truth = flat_composite()
    estimated = estimate_foreground(photo, alpha)
    half = (alpha > 100) & (alpha < 155)
    assert half.any()
    # The photo's own half-alpha pixels are olive (~115, 95, 35); the estimate is red.
    assert (photo[half, 0].astype(int) - photo[half, 1] < 60).all()
    assert (estimated[half, 0].astype(int) - estimated[half, 1] > 100).all()
    # Measured ~0.23 here.
    assert edge_error(estimated, truth, alpha) < 0.4 * edge_error(photo, truth, alpha)


def test_a_hard_mask_returns_the_photo_itself_without_work(photo_composite) -> None:
    photo, alpha, _ = photo_composite
    hard = np.where(alpha > 127, 255, 0).astype(np.uint8)
    assert estimate_foreground(photo, hard) is photo


def test_the_answer_does_not_depend_on_how_the_band_is_tiled_or_batched(
    photo_composite, monkeypatch
) -> None:
    # Odd sizes and a matte touching every border exercise the tiles at the photo's edges.
    photo, alpha, _ = photo_composite
    photo, alpha = photo[3:-2, 1:], np.roll(alpha, (40, 60), axis=(0, 1))[3:-2, 1:]
    tiled = estimate_foreground(photo, alpha)
    monkeypatch.setattr(foreground, "BATCH_TILES", 3)
    assert np.array_equal(estimate_foreground(photo, alpha), tiled)
    monkeypatch.setattr(foreground, "TILE", 1024)  # one tile holds the whole photo
    whole = estimate_foreground(photo, alpha)
    assert np.abs(tiled.astype(int) - whole).max() <= 1


@pytest.mark.parametrize("crop", [(slice(None), slice(None)), (slice(3, -2), slice(1, None))])
def test_the_torch_path_agrees_with_the_opencv_path(photo_composite, crop) -> None:
    # A GPU worker runs the torch path; it is checked here on the CPU. The odd-sized crop
    # leaves rows and columns past the last whole shrink cell.
    photo, alpha, truth = photo_composite
    photo, alpha, truth = photo[crop], alpha[crop], truth[crop]
    opencv = estimate_foreground(photo, alpha)
    on_torch = estimate_foreground(photo, alpha, device="cpu")
    hard = (alpha == 0) | (alpha == 255)
    assert on_torch.shape == photo.shape and on_torch.dtype == np.uint8
    assert np.array_equal(on_torch[hard], photo[hard])
    assert np.abs(on_torch.astype(int) - opencv).max() <= 1
    assert edge_error(on_torch, truth, alpha) < 0.6 * edge_error(photo, truth, alpha)


def test_window_sizes_scale_with_the_photo_so_a_thumbnail_behaves_alike() -> None:
    coarse_small, fine_small = foreground.window_sizes(2000, 1500)
    coarse_large, fine_large = foreground.window_sizes(4000, 3000)
    assert coarse_large == pytest.approx(2 * coarse_small, rel=0.1)
    assert fine_large == pytest.approx(2 * fine_small, rel=0.15)
    assert all(size % 2 == 1 for size in (coarse_small, fine_small, coarse_large, fine_large))


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 1), (2, 3), (33, 65)])
def test_slivers_and_tiny_photos_are_estimated_without_error(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, size, dtype=np.uint8)
    estimated = estimate_foreground(photo, alpha)
    hard = (alpha == 0) | (alpha == 255)
    assert estimated.shape == photo.shape
    assert np.array_equal(estimated[hard], photo[hard])


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        estimate_foreground(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError):
        estimate_foreground(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))


def render_pixels(
    photo: np.ndarray, alpha: np.ndarray, request: JobRequest, backdrop: np.ndarray | None
) -> tuple[np.ndarray, Timings]:
    timings = Timings()
    decoded = DecodedImage(rgb=photo, icc_profile=None, source_format="PNG")
    rendered = render(decoded, alpha, request, timings, background=backdrop)
    return np.asarray(Image.open(io.BytesIO(rendered.image))), timings


EFFECTS = {
    "transparent": {"background": "transparent"},
    "colour": {"background": "#2040FF"},
    "replace": {"effect": "replace", "background": "file:///backdrop.png"},
    "blur": {"effect": "blur", "blur_strength": 0.5},
    "desaturate": {"effect": "desaturate"},
}


@pytest.mark.parametrize("effect", EFFECTS)
def test_every_effect_shows_the_subjects_own_colours_at_its_edge(
    photo_composite, effect: str
) -> None:
    photo, alpha, truth = photo_composite
    request = JobRequest(input="file:///photo.png", **EFFECTS[effect])
    backdrop = cv2.resize(skimage.data.chelsea(), (200, 150))
    out, timings = render_pixels(photo, alpha, request, backdrop)
    ideal = apply_effect(photo, truth, alpha, request, backdrop)
    halo = apply_effect(photo, photo, alpha, request, backdrop)  # the photo's own colours
    band = (alpha > 0) & (alpha < 255)

    def error(pixels: np.ndarray) -> float:
        return float(np.abs(pixels[band].astype(np.float64) - ideal[band]).mean())

    assert error(out) < 0.6 * error(halo)  # measured 0.3-0.45
    assert "decontaminate" in timings.ms


def test_a_transparent_png_keeps_the_final_alpha_and_its_mask(photo_composite) -> None:
    photo, alpha, _ = photo_composite
    request = JobRequest(input="file:///photo.png", background="transparent")
    decoded = DecodedImage(rgb=photo, icc_profile=None, source_format="PNG")
    rendered = render(decoded, alpha, request, Timings(), want_mask=True)
    assert rendered.mask is not None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rendered.image)))[:, :, 3], alpha)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rendered.mask))), alpha)
