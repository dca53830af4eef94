"""refine_mask: the model's coarse mask turned into a full-resolution matte on the photo's edges."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from worker import refine
from worker.matting import NumpyBackend, TorchBackend
from worker.refine import (
    checked,
    colour_evidence,
    moved_mask,
    reference_alpha,
    refine_mask,
    shifted,
    working_size,
)


def step_scene(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured photo split by a slanted edge, its true alpha, and a model-like coarse mask."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:height, 0:width]
    truth = (xx < width * 0.45 + (yy - height / 2) * 0.2).astype(np.float32)
    noise = rng.normal(0, 6, (height, width, 3))
    left, right = np.array([200, 170, 60]), np.array([40, 70, 150])
    guide = truth[:, :, None] * left + (1 - truth[:, :, None]) * right + noise
    guide = np.clip(guide, 0, 255).astype(np.uint8)
    # What DeepLabV3 sees: 1/8 of a ~520 px input, handed over as a low-res soft map.
    model_w, model_h = 520 * width // height, 520
    coarse = cv2.resize(truth, (model_w // 8, model_h // 8), interpolation=cv2.INTER_AREA)
    soft = cv2.resize(coarse, (model_w, model_h), interpolation=cv2.INTER_LINEAR)
    return guide, truth, soft


def model_view(truth: np.ndarray) -> np.ndarray:
    """The truth as the segmenter hands it over: long side 520, stride-8 logits, bilinear up."""
    height, width = truth.shape
    scale = 520 / max(height, width)
    model_w, model_h = round(width * scale), round(height * scale)
    model_input = cv2.resize(truth, (model_w, model_h), interpolation=cv2.INTER_AREA)
    logits_size = (-(-model_w // 8), -(-model_h // 8))
    coarse = cv2.resize(model_input, logits_size, interpolation=cv2.INTER_AREA)
    return cv2.resize(coarse, (model_w, model_h), interpolation=cv2.INTER_LINEAR)


def tutorial_alpha(soft: np.ndarray, width: int, height: int) -> np.ndarray:
    """LearnOpenCV's recipe: threshold, 7x7 Gaussian at model resolution, bilinear resize."""
    blurred = cv2.GaussianBlur((soft > 0.5).astype(np.float32), (7, 7), 0)
    return cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR)


def test_refine_returns_full_resolution_uint8_alpha() -> None:
    guide, _, soft = step_scene(300, 200)
    alpha = refine_mask(soft, guide)
    assert alpha.shape == (200, 300)
    assert alpha.dtype == np.uint8


@pytest.mark.parametrize("size", [(480, 320), (2400, 1600)], ids=["thumbnail", "4MP"])
def test_refine_snaps_a_roughly_followed_edge_closer_than_bilinear_upsampling(size) -> None:
    width, height = size
    guide, truth, soft = step_scene(width, height)
    refined = refine_mask(soft, guide).astype(np.float32) / 255
    bilinear = cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR)
    refined_error = np.abs(refined - truth).mean()
    bilinear_error = np.abs(bilinear - truth).mean()
    assert refined_error < 0.5 * bilinear_error


def photo_composite(
    front: np.ndarray, back: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """front seen through a horse-shaped soft matte over back, and the model's view of it."""
    horse = (~skimage.data.horse()).astype(np.float32)
    target_h = int(height * 0.8)
    target_w = horse.shape[1] * target_h // horse.shape[0]
    canvas = np.zeros((height, width), np.float32)
    top, left = (height - target_h) // 2, (width - target_w) // 2
    scaled = cv2.resize(horse, (target_w, target_h), interpolation=cv2.INTER_LINEAR)
    canvas[top : top + target_h, left : left + target_w] = scaled > 0.5
    truth = cv2.GaussianBlur(canvas, (0, 0), 1.5)
    front = cv2.resize(front, (width, width))[:height].astype(np.float32)
    back = cv2.resize(back, (width, width))[:height].astype(np.float32)
    alpha = truth[:, :, None]
    guide = np.clip(front * alpha + back * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return guide, truth, model_view(truth)


def free_reference(soft: np.ndarray, width: int, height: int) -> np.ndarray:
    return reference_alpha(cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR))


def sad(alpha: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(alpha.astype(np.float32) - truth).sum())


def test_refine_halves_the_tutorials_edge_error_on_a_2mp_photo() -> None:
    width, height = 1632, 1224
    guide, truth, soft = photo_composite(
        skimage.data.astronaut(), skimage.data.coffee(), width, height
    )
    refined = refine_mask(soft, guide).astype(np.float32) / 255
    assert sad(refined, truth) <= 0.5 * sad(tutorial_alpha(soft, width, height), truth)
    assert sad(refined, truth) <= 0.8 * sad(free_reference(soft, width, height), truth)


def test_where_subject_and_background_share_colours_refine_is_no_worse_than_the_reference() -> None:
    width, height = 1024, 768
    coffee = skimage.data.coffee()
    guide, truth, soft = photo_composite(
        coffee, np.ascontiguousarray(coffee[:, ::-1]), width, height
    )
    refined = refine_mask(soft, guide).astype(np.float32) / 255
    assert sad(refined, truth) <= sad(free_reference(soft, width, height), truth)
    assert sad(refined, truth) <= sad(tutorial_alpha(soft, width, height), truth)


def test_the_check_replaces_a_matte_that_contradicts_the_mask_by_the_reference() -> None:
    mask = np.zeros((130, 130), np.float32)
    mask[:, 65:] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    reference = reference_alpha(mask)
    matte = reference.copy()
    matte[:60, 10:50] = 1.0  # colours claimed a stretch of the background for the subject
    result = checked(matte, mask, reference)
    assert np.abs(result[:50, 15:45] - reference[:50, 15:45]).max() < 0.05
    assert np.array_equal(result[100:], matte[100:])


def test_the_check_keeps_a_matte_that_sharpens_the_mask() -> None:
    mask = np.zeros((130, 130), np.float32)
    mask[:, 65:] = 1.0
    sharp = mask.copy()
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    assert np.array_equal(checked(sharp, mask, reference_alpha(mask)), sharp)


def grown_by_a_cell(truth: np.ndarray) -> np.ndarray:
    """The truth as a model over-reaching by one of its cells would see it."""
    cell = round(8 * truth.shape[1] / 520)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cell + 1,) * 2)
    return model_view(cv2.dilate(truth, kernel))


def working_view(soft: np.ndarray, guide: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask and photo at the size refine_mask works at, as it scales them."""
    size = working_size(guide.shape[1], guide.shape[0])
    small = cv2.resize(guide, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return cv2.resize(soft, size, interpolation=cv2.INTER_LINEAR), small


def test_a_mask_one_cell_too_large_is_pulled_back_onto_the_subject() -> None:
    width, height = 1024, 768
    guide, truth, _ = photo_composite(
        skimage.data.astronaut(), skimage.data.coffee(), width, height
    )
    soft = grown_by_a_cell(truth)
    refined = refine_mask(soft, guide).astype(np.float32) / 255
    assert sad(refined, truth) <= 0.5 * sad(tutorial_alpha(soft, width, height), truth)


def test_a_mask_one_cell_too_large_stays_where_colours_cannot_tell() -> None:
    rng = np.random.default_rng(11)
    lawn, other_lawn = (
        np.clip(rng.normal((70, 140, 50), 25, (512, 512, 3)), 0, 255).astype(np.uint8)
        for _ in range(2)
    )
    guide, truth, _ = photo_composite(lawn, other_lawn, 1024, 768)
    mask, small = working_view(grown_by_a_cell(truth), guide)
    llr, _ = colour_evidence(small, mask)
    assert moved_mask(mask, llr) is mask


def test_a_small_hard_supplied_mask_is_refined_onto_the_edges() -> None:
    guide, truth, _ = photo_composite(skimage.data.astronaut(), skimage.data.coffee(), 640, 480)
    hard = (cv2.resize(truth, (80, 60), interpolation=cv2.INTER_AREA) > 0.5).astype(np.float32)
    refined = refine_mask(hard, guide).astype(np.float32) / 255
    assert sad(refined, truth) < 0.5 * sad(tutorial_alpha(hard, 640, 480), truth)


def test_the_torch_solve_agrees_with_the_numpy_solve() -> None:
    guide, _, soft = photo_composite(skimage.data.astronaut(), skimage.data.coffee(), 640, 480)
    on_numpy = refine_mask(soft, guide).astype(np.int16)
    on_torch = refine_mask(soft, guide, backend=TorchBackend("cpu")).astype(np.int16)
    assert np.abs(on_numpy - on_torch).max() <= 2
    assert (on_numpy != on_torch).mean() < 0.001


def small_subject_scene() -> tuple[np.ndarray, np.ndarray]:
    """A horse in the bottom-right corner of a 1280x960 photo, cut off by its bottom edge, and
    the model's view of it."""
    width, height = 1280, 960
    guide_part, truth_part, _ = photo_composite(
        skimage.data.astronaut(), skimage.data.coffee(), 400, 300
    )
    guide = cv2.resize(skimage.data.chelsea(), (width, height), interpolation=cv2.INTER_AREA)
    truth = np.zeros((height, width), np.float32)
    guide[-200:, -400:] = guide_part[:200]
    truth[-200:, -400:] = truth_part[:200]
    return guide, model_view(truth)


@pytest.mark.parametrize("backend", [None, TorchBackend("cpu")], ids=["numpy", "torch"])
def test_a_small_subject_gets_the_alpha_the_whole_frame_computation_gives(
    monkeypatch, backend
) -> None:
    guide, soft = small_subject_scene()
    tiled = refine_mask(soft, guide, backend=backend).astype(np.int16)
    # Every pixel live: the guided model fitted on the whole grid, a · I + b on every pixel.
    monkeypatch.setattr(refine, "_live", lambda matte: np.ones(matte.shape, bool))
    whole = refine_mask(soft, guide, backend=backend).astype(np.int16)
    assert np.abs(tiled - whole).max() <= 1
    assert 0 < (tiled > 127).mean() < 0.2


def working_scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """(channel-first working guide, working mask) for a subject in the frame's middle and one
    cut by the frame's bottom edge."""
    guide, _, soft = photo_composite(skimage.data.astronaut(), skimage.data.coffee(), 960, 720)
    scenes = []
    for soft_, guide_ in ((soft, guide), small_subject_scene()[::-1]):
        mask, small = working_view(soft_, guide_)
        scenes.append((np.ascontiguousarray(small.transpose(2, 0, 1)), mask))
    return scenes


@pytest.mark.parametrize("backend", [NumpyBackend(), TorchBackend("cpu")], ids=["numpy", "torch"])
def test_the_strip_solved_in_its_tiles_equals_the_strip_solved_in_its_bounding_box(
    monkeypatch, backend
) -> None:
    for channels, mask in working_scenes():
        tiled = refine.matte_strip(channels, mask, backend)
        # One tile larger than the strip's bounding box: the box is solved instead.
        monkeypatch.setattr(refine, "SOLVE_TILE", 4096)
        boxed = refine.matte_strip(channels, mask, backend)
        monkeypatch.undo()
        assert np.abs(tiled - boxed).max() < 1e-3  # float32 rounding: 2e-4 at most seen
        assert ((tiled > 0) & (tiled < 1)).sum() > 200  # a solved edge, not a step


def test_refine_is_deterministic() -> None:
    guide, _, soft = step_scene(300, 200)
    assert np.array_equal(refine_mask(soft, guide), refine_mask(soft, guide))


@pytest.mark.parametrize(("value", "expected"), [(0.0, 0), (1.0, 255)])
def test_constant_masks_stay_constant(photo_paths, value: float, expected: int) -> None:
    from PIL import Image

    guide = np.asarray(Image.open(photo_paths["astronaut"]).convert("RGB"))
    soft = np.full((64, 64), value, np.float32)
    alpha = refine_mask(soft, guide)
    assert alpha.shape == guide.shape[:2]
    assert (alpha == expected).all()


def test_refine_accepts_a_full_resolution_coarse_mask() -> None:
    guide, truth, _ = step_scene(300, 200)
    alpha = refine_mask(truth, guide)
    assert np.abs(alpha.astype(np.float32) / 255 - truth).mean() < 0.02


def test_refine_handles_a_sliver_of_an_image() -> None:
    rng = np.random.default_rng(5)
    guide = rng.integers(0, 256, (3, 200, 3), dtype=np.uint8)
    soft = np.zeros((3, 200), np.float32)
    soft[:, :100] = 1.0
    alpha = refine_mask(soft, guide)
    assert alpha.shape == (3, 200)
    assert alpha[:, :80].mean() > 200
    assert alpha[:, 120:].mean() < 55


def test_refine_accepts_a_mask_whose_aspect_is_a_pixel_off() -> None:
    guide, truth, soft = step_scene(301, 200)
    alpha = refine_mask(soft[:, :-1], guide)
    assert alpha.shape == (200, 301)
    assert np.abs(alpha.astype(np.float32) / 255 - truth).mean() < 0.05


def test_refine_rejects_a_guide_that_is_not_rgb() -> None:
    with pytest.raises(ValueError):
        refine_mask(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("origin", [(0, 0), (37, 500), (1136, 1536)], ids=str)
def test_a_block_of_the_upsampled_model_matches_the_whole_planes_resize(origin) -> None:
    coefficients = np.random.default_rng(4).random((474, 632, 4), dtype=np.float32)
    whole = cv2.resize(coefficients, (1600, 1200), interpolation=cv2.INTER_LINEAR)
    top, left = origin
    block = refine._upsampled(coefficients, (1200, 1600), (64, 64), origin)
    assert np.abs(block - whole[top : top + 64, left : left + 64]).max() < 1e-3


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("move", [(-7, 0), (3, -5), (0, 9), (-4, -4), (30, 2), (-2, -40)], ids=str)
def test_a_shifted_mask_is_what_warp_affine_makes_of_it(move, dtype) -> None:
    image = (np.random.default_rng(5).random((20, 24)) * 200).astype(dtype)
    dx, dy = move
    shift = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    warped = cv2.warpAffine(image, shift, (24, 20), borderMode=cv2.BORDER_REPLICATE)
    assert np.array_equal(shifted(image, dx, dy), warped)
