"""Compositing: the four background effects, uint8 in and out at full resolution.

Every effect draws the subject with its foreground colours F (worker/foreground.py: the
photo's own colours except in the edge band, where the old background's share is taken out),
so edge pixels show the subject over the new background, not a halo of the old one. Effects
that keep the photo's background (blur, desaturate) take the photo too, and use I − a·F, the
old background's own share of each edge pixel, as that background.

All blending goes through OpenCV (which releases the GIL, so a worker's threads composite in
parallel) in uint8/uint16/float32: an alpha of 255 keeps the subject's pixel exactly and 0
gives the background's pixel exactly, with no float64 copies of a 12 MP photo.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from producer.errors import InvalidRequest
from producer.request import HEX_COLOUR

# Blur sigma at strength 1, as a share of the image diagonal (so thumbnails look alike).
BLUR_SIGMA_FRACTION = 0.02
# Blurs wider than this many pixels are computed at a reduced scale where sigma is this wide:
# a Gaussian that wide has no detail left that bilinear upsampling could lose.
BLUR_WORKING_SIGMA = 4.0
# Rec.601 luma weights of R, G, B: what cv2.COLOR_RGB2GRAY computes.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Background weight below which a neighbourhood is all subject and the plain blur takes over.
_WEIGHT_GUARD = 1e-3


def parse_colour(hex_colour: str) -> tuple[int, int, int]:
    """'#RRGGBB' → (r, g, b)."""
    match = HEX_COLOUR.fullmatch(hex_colour.strip()) if isinstance(hex_colour, str) else None
    if match is None:
        raise InvalidRequest(f"background colour must be #RRGGBB, got {hex_colour!r}")
    red, green, blue = (int(part, 16) for part in match.groups())
    return red, green, blue


def cover(background: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale the background to cover width x height and centre-crop it; never stretch."""
    source_h, source_w = background.shape[:2]
    scale = max(width / source_w, height / source_h)
    # Crop in source pixels first, so only the visible part is resampled.
    crop_w = min(source_w, max(1, round(width / scale)))
    crop_h = min(source_h, max(1, round(height / scale)))
    left, top = (source_w - crop_w) // 2, (source_h - crop_h) // 2
    crop = background[top : top + crop_h, left : left + crop_w]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(crop, (width, height), interpolation=interpolation)


def blend(foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((fg·a + bg·(255 − a)) / 255) per channel: exactly fg at a = 255, bg at a = 0."""
    weight = alpha.astype(np.float32)
    # One fused OpenCV pass, rounding to nearest. float32 is exact enough: the true quotient
    # is never within 1/510 of a half (255 is odd), far beyond float32's error at 255.
    return cv2.blendLinear(foreground, background, weight, 255.0 - weight)


def remove_background(
    foreground: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int] | None
) -> np.ndarray:
    """None → RGBA: F with straight (not premultiplied) alpha; else F over the colour."""
    if colour is None:
        return cv2.merge([*cv2.split(foreground), alpha])
    height, width = foreground.shape[:2]
    return blend(foreground, _solid(width, height, colour), alpha)


def replace_background(
    foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """The subject over another photo of any size, scaled to cover the frame."""
    height, width = foreground.shape[:2]
    return blend(foreground, cover(background, width, height), alpha)


def blur_background(
    image: np.ndarray,
    alpha: np.ndarray,
    strength: float,
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """The subject (F, default the photo) over a blur of its own background, with no halo."""
    if not 0 < strength <= 1:
        raise InvalidRequest(f"blur strength must be in (0, 1], got {strength}")
    foreground = image if foreground is None else foreground
    height, width = image.shape[:2]
    sigma = blur_sigma(width, height, strength)
    return blend(foreground, background_blur(image, alpha, sigma, foreground), alpha)


def blur_sigma(width: int, height: int, strength: float) -> float:
    """Gaussian sigma in pixels: proportional to the diagonal, so every size looks alike."""
    return max(0.5, strength * BLUR_SIGMA_FRACTION * math.hypot(width, height))


def background_blur(
    image: np.ndarray, alpha: np.ndarray, sigma: float, foreground: np.ndarray | None = None
) -> np.ndarray:
    """Normalised convolution blur((1 − a)·B) / blur(1 − a): the subject is left out.

    A plain blur would smear the subject's colours into the background around it (the
    tutorial's halo). (1 − a)·B is I − a·F given the foreground F, and I·(1 − a) without
    one (which keeps a·(1 − a)·F of subject colour in edge pixels). Where the whole
    neighbourhood is subject the weights vanish, and the plain blur fills in smoothly
    instead of noise.
    """
    height, width = image.shape[:2]
    scale = min(1.0, BLUR_WORKING_SIGMA / sigma)
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    weight = cv2.subtract(np.full_like(alpha, 255), alpha)
    # Weight at full resolution before shrinking, or subject colours leak in via mixed pixels.
    weighted = cv2.multiply(image, cv2.merge([weight, weight, weight]), dtype=cv2.CV_16U)
    if foreground is not None and foreground is not image:
        _take_out_subject(weighted, image, foreground, alpha)
    weighted = _shrink(weighted, small_w, small_h).astype(np.float32) * (1 / 255)
    weight_small = _shrink(weight, small_w, small_h).astype(np.float32) * (1 / 255)
    small_sigma = sigma * scale
    numerator: np.ndarray = cv2.GaussianBlur(
        weighted, (0, 0), small_sigma, borderType=cv2.BORDER_REFLECT
    )
    denominator: np.ndarray = cv2.GaussianBlur(
        weight_small, (0, 0), small_sigma, borderType=cv2.BORDER_REFLECT
    )
    plain = cv2.GaussianBlur(
        _shrink(image, small_w, small_h).astype(np.float32),
        (0, 0),
        small_sigma,
        borderType=cv2.BORDER_REFLECT,
    )
    # (num + g·plain) / (den + g): num/den where there is background, plain blur where none.
    numerator += _WEIGHT_GUARD * plain
    denominator += _WEIGHT_GUARD
    blurred = numerator / denominator[:, :, None]
    result: np.ndarray = np.clip(blurred + 0.5, 0, 255).astype(np.uint8)
    if (small_w, small_h) != (width, height):
        result = cv2.resize(result, (width, height), interpolation=cv2.INTER_LINEAR)
    return result


def desaturate_background(
    image: np.ndarray, alpha: np.ndarray, foreground: np.ndarray | None = None
) -> np.ndarray:
    """The subject (F, default the photo) in colour over a greyscale background (Rec.601 luma).

    An edge pixel shows a·F + (1 − a)·grey(B), where (1 − a)·B = I − a·F is the old
    background's share of it; grey is linear, so grey(B) = (grey(I) − a·grey(F)) / (1 − a).
    Greying the whole pixel instead would keep a grey ghost of the subject's own edge.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if foreground is not None and foreground is not image:
        band = _band(alpha)
        if band.size:
            weight = _take(alpha, band).astype(np.float32) * (1 / 255)
            subject_grey = _take(foreground, band).astype(np.float32) @ _LUMA
            background_grey = (_take(grey, band) - weight * subject_grey) / (1 - weight)
            grey.reshape(-1)[band] = np.clip(background_grey + 0.5, 0, 255).astype(np.uint8)
    colour = image if foreground is None else foreground
    return blend(colour, cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), alpha)


def _solid(width: int, height: int, colour: tuple[int, int, int]) -> np.ndarray:
    # Repeating the 3-byte pattern is a memcpy; numpy's broadcast fill is ~10x slower.
    pattern = bytes(colour) * (width * height)
    return np.frombuffer(pattern, np.uint8).reshape(height, width, 3)


def _shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _take_out_subject(
    weighted: np.ndarray, image: np.ndarray, foreground: np.ndarray, alpha: np.ndarray
) -> None:
    """In edge pixels, I·(255 − a) → 255·I − a·F: all that is left of the old background."""
    band = _band(alpha)
    if band.size == 0:
        return
    colour = _take(image, band).astype(np.int32) * 255
    colour -= (
        _take(foreground, band).astype(np.int32) * _take(alpha, band).astype(np.int32)[:, None]
    )
    _put(weighted, band, np.clip(colour, 0, 255 * 255).astype(np.uint16))


def _band(alpha: np.ndarray) -> np.ndarray:
    """Flat indices of the pixels of partial alpha."""
    return _flat_indices(cv2.inRange(alpha, 1, 254))


def _flat_indices(mask: np.ndarray) -> np.ndarray:
    # numpy finds the nonzero entries of a bool array several times faster than of uint8.
    return np.flatnonzero(np.bitwise_and(mask, 1, out=mask).view(bool))


def _take(plane: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.take(plane.reshape(-1, *plane.shape[2:]), index, axis=0)


def _put(plane: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    # Each pixel viewed as one opaque item: numpy's row-wise fancy assignment is ~2x slower.
    item = np.dtype((np.void, plane.shape[2] * plane.itemsize))
    pixels = plane.reshape(-1, plane.shape[2]).view(item).reshape(-1)
    pixels[index] = np.ascontiguousarray(values, plane.dtype).view(item).reshape(-1)
