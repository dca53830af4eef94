"""Marketplace crops: the subject's box, margin, centred fit and fill, on known masks."""

from __future__ import annotations

import numpy as np
import pytest

from producer.errors import InvalidRequest
from producer.request import parse_request
from worker.crop import CLEAR, Box, fill_for, fitted_size, frame, frame_for, subject_box

GREY = (128, 128, 128)


def mask_with(rect: tuple[int, int, int, int], shape: tuple[int, int] = (100, 200)) -> np.ndarray:
    """A 0/255 alpha (height, width) whose subject is the rectangle (left, top, right, bottom)."""
    alpha = np.zeros(shape, np.uint8)
    left, top, right, bottom = rect
    alpha[top:bottom, left:right] = 255
    return alpha


def grey_photo(alpha: np.ndarray) -> np.ndarray:
    return np.full((*alpha.shape, 3), GREY, np.uint8)


def request(**fields: object) -> object:
    return parse_request({"input": "s3://bkt/photo.jpg", **fields})


# --- the subject's box -------------------------------------------------------------------


def test_the_box_is_the_subjects_bounding_box_without_margin() -> None:
    assert subject_box(mask_with((50, 20, 90, 60)), 0.0) == Box(50, 20, 90, 60)


def test_only_pixels_above_half_alpha_are_subject() -> None:
    alpha = mask_with((50, 20, 90, 60))
    alpha[0:5, 0:5] = 127  # half-transparent haze is not subject
    alpha[90, 150] = 128
    assert subject_box(alpha, 0.0) == Box(50, 20, 151, 91)


def test_the_margin_is_a_share_of_the_boxs_longer_side_on_every_side() -> None:
    # 40 wide, 20 tall: 10% of 40 = 4 pixels on each side.
    assert subject_box(mask_with((50, 30, 90, 50)), 0.1) == Box(46, 26, 94, 54)


def test_the_margin_is_clipped_at_the_frame() -> None:
    # 60 wide subject at the top-left corner: 50% of 60 = 30 pixels would leave the frame.
    assert subject_box(mask_with((0, 0, 60, 40)), 0.5) == Box(0, 0, 90, 70)
    assert subject_box(mask_with((150, 70, 200, 100)), 1.0) == Box(100, 20, 200, 100)


def test_a_photo_without_subject_has_no_box() -> None:
    assert subject_box(np.full((10, 10), 127, np.uint8), 0.05) is None


# --- the fit into a canvas ---------------------------------------------------------------


def test_a_crop_without_size_is_just_the_box() -> None:
    alpha = mask_with((50, 20, 90, 60))
    framed = frame(grey_photo(alpha), alpha, crop=True, margin=0.0, size=None, fill=(255,) * 3)
    assert framed.pixels.shape == (40, 40, 3)
    assert (framed.alpha == 255).all()


def test_the_cropped_subject_is_centred_to_the_pixel_and_the_rest_is_filled() -> None:
    alpha = mask_with((50, 20, 90, 60))  # 40 x 40
    framed = frame(
        grey_photo(alpha), alpha, crop=True, margin=0.0, size=(100, 60), fill=(255, 0, 0)
    )
    assert framed.pixels.shape == (60, 100, 3)
    rows, columns = np.nonzero(framed.alpha)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (10, 49, 30, 69)
    assert (framed.pixels[10:50, 30:70] == GREY).all()
    assert (framed.pixels[:, :30] == (255, 0, 0)).all() and (
        framed.pixels[:10] == (255, 0, 0)
    ).all()
    assert framed.alpha[:, :30].max() == 0


def test_an_odd_leftover_puts_the_extra_pixel_right_and_below() -> None:
    alpha = mask_with((0, 0, 10, 10), shape=(10, 10))
    framed = frame(grey_photo(alpha), alpha, crop=False, margin=0.0, size=(13, 11), fill=(0, 0, 0))
    rows, columns = np.nonzero(framed.alpha)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (0, 9, 1, 10)


def test_a_small_subject_is_never_upscaled() -> None:
    alpha = mask_with((50, 20, 90, 60))
    framed = frame(
        grey_photo(alpha), alpha, crop=True, margin=0.0, size=(1000, 1000), fill=(255,) * 3
    )
    assert framed.pixels.shape == (1000, 1000, 3)
    assert np.count_nonzero(framed.alpha) == 40 * 40


def test_a_large_result_is_scaled_down_to_fit_keeping_its_aspect() -> None:
    alpha = mask_with((0, 0, 200, 100))  # the whole 200 x 100 frame is subject
    framed = frame(grey_photo(alpha), alpha, crop=False, margin=0.0, size=(50, 50), fill=(255,) * 3)
    rows, columns = np.nonzero(framed.alpha > 127)
    assert (columns.min(), columns.max()) == (0, 49)
    assert (rows.min(), rows.max()) == (12, 36)  # 25 rows, centred in 50
    assert fitted_size(200, 100, (50, 50)) == (50, 25)
    assert fitted_size(20, 10, (50, 50)) == (20, 10)


def test_without_crop_and_size_the_output_is_untouched() -> None:
    alpha = mask_with((50, 20, 90, 60))
    photo = grey_photo(alpha)
    framed = frame_for(request(), photo, alpha)
    assert framed.pixels is photo and framed.alpha is alpha


def test_a_crop_of_a_photo_without_subject_keeps_the_whole_photo() -> None:
    alpha = np.zeros((30, 40), np.uint8)
    framed = frame(grey_photo(alpha), alpha, crop=True, margin=0.05, size=None, fill=(255,) * 3)
    assert framed.pixels.shape == (30, 40, 3)


# --- transparent outputs -----------------------------------------------------------------


def test_a_transparent_output_is_padded_clear_and_its_alpha_channel_is_the_mask() -> None:
    alpha = mask_with((50, 20, 90, 60))
    rgba = np.dstack([grey_photo(alpha), alpha])
    framed = frame(rgba, alpha, crop=True, margin=0.25, size=(80, 80), fill=CLEAR)
    assert framed.pixels.shape == (80, 80, 4)
    assert (framed.pixels[:, :, 3] == framed.alpha).all()
    assert tuple(framed.pixels[0, 0]) == CLEAR


def test_shrinking_a_transparent_output_does_not_bleed_hidden_colours_into_the_edge() -> None:
    alpha = mask_with((0, 0, 50, 100), shape=(100, 100))
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[:, :, 1] = 255  # hidden green where the alpha is 0
    rgba[:, :50] = (255, 0, 0, 255)
    rgba[:, :, 3] = alpha
    framed = frame(rgba, alpha, crop=False, margin=0.0, size=(33, 33), fill=CLEAR)
    visible = framed.pixels[framed.pixels[:, :, 3] > 0]
    assert (visible[:, 0] == 255).all() and (visible[:, 1] == 0).all()
    assert (framed.alpha[:, 16] > 0).all() and (framed.alpha[:, 16] < 255).all()


# --- the fill colour and the request fields ----------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fill"),
    [
        ({}, (255, 255, 255)),
        ({"background": "#10A0ff"}, (16, 160, 255)),
        ({"background": "transparent"}, CLEAR),
        ({"effect": "blur"}, (255, 255, 255)),
        ({"effect": "replace", "background": "s3://bkt/beach.jpg"}, (255, 255, 255)),
    ],
)
def test_the_canvas_is_filled_with_the_jobs_background(fields: dict, fill: tuple) -> None:
    assert fill_for(request(**fields)) == fill


def test_crop_fields_default_to_the_spec_and_stay_out_of_params_when_unused() -> None:
    plain = request()
    assert (plain.crop, plain.margin, plain.size, plain.canvas) == ("none", 0.05, None, None)
    assert {"crop", "margin", "size"}.isdisjoint(plain.params())
    framed = request(crop="subject", size="1000X800")
    assert framed.canvas == (1000, 800)
    assert {
        "crop": "subject",
        "margin": 0.05,
        "size": "1000x800",
    }.items() <= framed.params().items()


def test_size_without_crop_fits_the_whole_image() -> None:
    fitted = request(size="500x500")
    assert fitted.crop == "none" and fitted.canvas == (500, 500)
    assert fitted.params()["size"] == "500x500" and "margin" not in fitted.params()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"crop": "box"}, "crop: Input should be 'none' or 'subject'"),
        ({"crop": "subject", "margin": 1.5}, "margin: .*less than or equal to 1"),
        ({"crop": "subject", "margin": -0.1}, "margin: .*greater than or equal to 0"),
        ({"crop": "subject", "margin": "0.1"}, "margin: Input should be a valid number"),
        ({"margin": 0.1}, "margin applies only with crop 'subject'"),
        ({"size": "1000"}, r"size: expected WxH in pixels, e\.g\. 1000x1000"),
        ({"size": "10x-5"}, "size: expected WxH"),
        ({"size": "0x100"}, "size: each side must be 1 to 8192 pixels"),
        ({"size": "9000x100"}, "size: each side must be 1 to 8192 pixels"),
        ({"size": [100, 100]}, "size: Input should be a valid string"),
    ],
)
def test_bad_crop_fields_are_refused_with_a_readable_reason(fields: dict, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        request(**fields)
