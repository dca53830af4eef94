"""The four effects' contracts, proved on small images with known masks."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from producer.errors import InvalidRequest
from worker import composite
from worker.imageio import encode_image


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A noisy photo-like image with a square subject (255) on background (0), soft edges."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    alpha = np.zeros((120, 160), np.uint8)
    alpha[30:90, 50:110] = 255
    alpha[29, 50:110] = 128
    return image, alpha


def test_parse_colour_reads_hex_triplets() -> None:
    assert composite.parse_colour("#FF8000") == (255, 128, 0)
    assert composite.parse_colour("#0a0B0c") == (10, 11, 12)


@pytest.mark.parametrize("bad", ["", "FF8000", "#FF80", "#GG0000", "#FF800000", "red", "#ff 800"])
def test_parse_colour_rejects_anything_but_hash_rrggbb(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        composite.parse_colour(bad)


def test_blend_is_exact_at_the_ends_and_rounds_to_nearest_between() -> None:
    grid = np.arange(256, dtype=np.uint8)
    fg = np.repeat(grid[:, None], 256, axis=1)
    bg = fg.T.copy()
    fg3, bg3 = np.dstack([fg] * 3), np.dstack([bg] * 3)
    for a in (0, 1, 127, 128, 254, 255):
        alpha = np.full(fg.shape, a, np.uint8)
        expected = np.floor((fg3 * float(a) + bg3 * (255.0 - a)) / 255 + 0.5)
        assert np.array_equal(composite.blend(fg3, bg3, alpha), expected)


def test_remove_keeps_subject_pixels_unchanged_where_alpha_is_255(scene) -> None:
    image, alpha = scene
    out = composite.remove_background(image, alpha, (0, 200, 50))
    inside = alpha == 255
    assert out.shape == image.shape
    assert np.array_equal(out[inside], image[inside])


def test_remove_paints_the_requested_colour_exactly_where_alpha_is_0(scene) -> None:
    image, alpha = scene
    out = composite.remove_background(image, alpha, (0, 200, 50))
    assert (out[alpha == 0] == (0, 200, 50)).all()


def test_remove_transparent_returns_rgba_with_rgb_unchanged_and_alpha_as_fourth_channel(
    scene,
) -> None:
    image, alpha = scene
    out = composite.remove_background(image, alpha, None)
    assert out.shape == (*image.shape[:2], 4)
    assert np.array_equal(out[:, :, :3], image)
    assert np.array_equal(out[:, :, 3], alpha)


def test_replace_shows_the_covered_background_where_alpha_is_0(scene) -> None:
    image, alpha = scene
    background = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = composite.replace_background(image, alpha, background)
    covered = composite.cover(background, 160, 120)
    assert out.shape == image.shape
    assert np.array_equal(out[alpha == 0], covered[alpha == 0])
    assert np.array_equal(out[alpha == 255], image[alpha == 255])


def test_cover_centre_crops_a_wide_background_without_stretching() -> None:
    # Left quarter red, middle half green, right quarter blue: a 2:1 image covering a 1:1 frame
    # must keep only the green middle (a stretch would show red and blue at the sides).
    background = np.zeros((100, 200, 3), np.uint8)
    background[:, :50] = (255, 0, 0)
    background[:, 50:150] = (0, 255, 0)
    background[:, 150:] = (0, 0, 255)
    out = composite.cover(background, 80, 80)
    assert out.shape == (80, 80, 3)
    assert (out[:, 1:-1] == (0, 255, 0)).all()


def test_cover_centre_crops_a_tall_background_to_its_middle_rows() -> None:
    background = np.zeros((400, 100, 3), np.uint8)
    background[:100] = 255
    background[300:] = 255
    out = composite.cover(background, 300, 150)  # scale 3: rows 150..250 of the source
    assert out.shape == (150, 300, 3)
    assert (out == 0).all()


def test_desaturate_turns_the_background_into_its_rgb2gray_luma(scene) -> None:
    image, alpha = scene
    out = composite.desaturate_background(image, alpha)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    background = alpha == 0
    for channel in range(3):
        assert np.array_equal(out[:, :, channel][background], grey[background])
    assert np.array_equal(out[alpha == 255], image[alpha == 255])


def test_desaturate_uses_rgb_weights_not_the_tutorials_bgr_ones() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[:] = (255, 0, 0)
    out = composite.desaturate_background(red, np.zeros((4, 4), np.uint8))
    assert out[0, 0, 0] == 76  # 0.299 * 255; BGR weights would give 29


def masked_blur_reference(image: np.ndarray, alpha: np.ndarray, sigma: float) -> np.ndarray:
    """The background blur by its definition, at full resolution in float64:
    G∗((1 − a)·I) / G∗(1 − a), the subject left out of every average."""
    weight = 1 - alpha.astype(np.float64) / 255
    numerator = cv2.GaussianBlur(
        image.astype(np.float64) * weight[:, :, None], (0, 0), sigma, borderType=cv2.BORDER_REFLECT
    )
    denominator = cv2.GaussianBlur(weight, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return numerator / np.maximum(denominator, 1e-12)[:, :, None]


@pytest.mark.parametrize(
    ("size", "strength"),
    [((160, 120), 0.5), ((800, 600), 1.0)],  # the second blurs on a shrunken working copy
)
def test_blur_keeps_the_subject_and_shows_a_blur_of_the_background_alone(
    size: tuple[int, int], strength: float
) -> None:
    width, height = size
    image = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.zeros((height, width), np.uint8)
    alpha[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    image[alpha == 255] = (255, 0, 0)  # a subject colour a plain blur would smear outwards
    out = composite.blur_background(image, alpha, strength)
    reference = masked_blur_reference(image, alpha, composite.blur_sigma(width, height, strength))
    background = alpha == 0
    assert np.array_equal(out[alpha == 255], image[alpha == 255])
    # Rounding, and the working copy's resampling; a plain blur is off by tens of levels.
    assert np.abs(out[background] - reference[background]).max() <= 1.5
    assert out[background].std() < image[background].std() / 3


def test_blur_leaves_no_halo_of_subject_colour_around_the_subject() -> None:
    image = np.full((200, 300, 3), 20, np.uint8)
    alpha = np.zeros((200, 300), np.uint8)
    alpha[60:140, 110:190] = 255
    image[alpha == 255] = (255, 0, 0)
    out = composite.blur_background(image, alpha, 1.0)
    ring = cv2.dilate(alpha, np.ones((21, 21), np.uint8)) & ~alpha
    naive = cv2.GaussianBlur(image, (0, 0), composite.blur_sigma(300, 200, 1.0))
    assert naive[ring > 0, 0].max() > 100  # the tutorial's blur bleeds red into the background
    assert out[ring > 0].max() <= 21


def test_blur_sigma_scales_with_the_diagonal_so_sizes_look_alike() -> None:
    small = composite.blur_sigma(400, 300, 0.5)
    large = composite.blur_sigma(4000, 3000, 0.5)
    assert large == pytest.approx(10 * small)


def test_blur_rejects_strength_outside_zero_to_one(scene) -> None:
    image, alpha = scene
    with pytest.raises(InvalidRequest):
        composite.blur_background(image, alpha, 0)


def test_effects_on_a_real_12_megapixel_photo_keep_its_size(photo_paths) -> None:
    from PIL import Image

    small = np.asarray(Image.open(photo_paths["coffee"]).convert("RGB"))
    image = cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    alpha = np.zeros((3000, 4000), np.uint8)
    alpha[1000:2000, 1500:2500] = 255
    for out in (
        composite.remove_background(image, alpha, (255, 255, 255)),
        composite.blur_background(image, alpha, 1.0),
        composite.replace_background(image, alpha, small),
    ):
        assert out.shape == image.shape
        assert np.array_equal(out[1000:2000, 1500:2500], image[1000:2000, 1500:2500])


RED, GREEN = (200, 30, 30), (30, 160, 40)


@pytest.fixture
def red_over_green() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo, alpha, foreground): a pure red subject over green with a soft edge."""
    alpha = np.zeros((120, 160), np.uint8)
    alpha[:, 80:] = 255
    alpha = cv2.GaussianBlur(alpha, (0, 0), 2)
    foreground = np.full((120, 160, 3), RED, np.uint8)
    photo = composite.blend(foreground, np.full_like(foreground, GREEN), alpha)
    return photo, alpha, foreground


def half_alpha(alpha: np.ndarray) -> np.ndarray:
    half = (alpha > 100) & (alpha < 155)
    assert half.any()
    return half


def expected_blend(
    alpha: np.ndarray, front: tuple[int, int, int], back: tuple[int, int, int]
) -> np.ndarray:
    weight = alpha.astype(np.float64)[:, :, None] / 255
    return np.asarray(front) * weight + np.asarray(back) * (1 - weight)


def test_transparent_output_carries_the_subjects_colour_with_straight_alpha(
    red_over_green,
) -> None:
    photo, alpha, foreground = red_over_green
    out = composite.remove_background(foreground, alpha, None)
    half = half_alpha(alpha)
    # Straight alpha: a half-transparent edge pixel is the subject's full red, neither
    # darkened (premultiplied) nor olive (the photo's own mix with the old green).
    assert (out[half, :3] == RED).all()
    assert np.array_equal(out[:, :, 3], alpha)
    assert (photo[half, 0].astype(int) - photo[half, 1] < 60).all()


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encoded_transparent_outputs_keep_straight_alpha(red_over_green, fmt: str) -> None:
    _, alpha, foreground = red_over_green
    encoded = encode_image(composite.remove_background(foreground, alpha, None), fmt)
    decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGBA"))
    half = half_alpha(alpha)
    assert np.array_equal(decoded[:, :, 3], alpha)
    assert np.abs(decoded[half, :3].astype(int) - RED).max() <= 4  # webp is lossy


def test_remove_onto_a_colour_mixes_the_subject_with_that_colour_only(red_over_green) -> None:
    _, alpha, foreground = red_over_green
    blue = (0, 0, 255)
    out = composite.remove_background(foreground, alpha, blue)
    assert np.abs(out - expected_blend(alpha, RED, blue)).max() <= 0.5 + 1e-9


def test_replace_mixes_the_subject_with_the_new_background_only(red_over_green) -> None:
    _, alpha, foreground = red_over_green
    blue = (0, 0, 255)
    out = composite.replace_background(foreground, alpha, np.full((60, 80, 3), blue, np.uint8))
    assert np.abs(out - expected_blend(alpha, RED, blue)).max() <= 1


def test_blur_takes_the_subjects_share_out_of_edge_pixels_before_blurring(red_over_green) -> None:
    photo, alpha, foreground = red_over_green
    sigma = composite.blur_sigma(160, 120, 1.0)
    band = (alpha > 0) & (alpha < 255)
    without = composite.background_blur(photo, alpha, sigma)
    with_foreground = composite.background_blur(photo, alpha, sigma, foreground)
    # I·(1 − a) keeps a·(1 − a) of the subject's red in edge pixels; I − a·F keeps none.
    assert without[band, 0].max() > GREEN[0] + 15
    assert np.abs(with_foreground[band].astype(int) - GREEN).max() <= 2


def test_blur_draws_the_subject_with_its_foreground_colours(red_over_green) -> None:
    photo, alpha, foreground = red_over_green
    out = composite.blur_background(photo, alpha, 1.0, foreground)
    # The old background is flat green, so its blur is green and the edge is red over green.
    assert np.abs(out - expected_blend(alpha, RED, GREEN)).max() <= 2


def test_desaturate_greys_the_old_backgrounds_share_of_edge_pixels_only(red_over_green) -> None:
    photo, alpha, foreground = red_over_green
    grey_green = 0.299 * GREEN[0] + 0.587 * GREEN[1] + 0.114 * GREEN[2]
    expected = expected_blend(alpha, RED, (grey_green,) * 3)
    out = composite.desaturate_background(photo, alpha, foreground)
    without = composite.desaturate_background(photo, alpha)
    # Greying the whole edge pixel greys the subject's share too (a grey ghost of red).
    assert np.abs(without - expected).max() > 10
    assert np.abs(out - expected).max() <= 1
