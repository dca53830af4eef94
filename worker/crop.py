"""Marketplace framing: crop a rendered output to its subject and fit it into a fixed canvas.

Runs after compositing, on the effect's pixels (RGB, or RGBA for a transparent output) and the
job's alpha together, so a saved mask stays aligned with the image it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from producer.request import Crop, Effect, JobRequest
from worker.composite import parse_colour

# The SPEC's subject: alpha > 0.5, on the 0..255 scale.
SUBJECT_ALPHA = 127
WHITE = (255, 255, 255)
# Transparent padding keeps white colour values, so a viewer that drops alpha shows white.
CLEAR = (255, 255, 255, 0)


@dataclass(frozen=True)
class Box:
    """A pixel rectangle; right and bottom are exclusive, as in slicing."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass(frozen=True)
class Framed:
    pixels: np.ndarray
    alpha: np.ndarray


def frame_for(request: JobRequest, pixels: np.ndarray, alpha: np.ndarray) -> Framed:
    """The request's `crop`, `margin` and `size` applied to a composited output and its alpha
    (unchanged when it asks for neither)."""
    return frame(
        pixels,
        alpha,
        crop=request.crop == Crop.SUBJECT,
        margin=request.margin,
        size=request.canvas,
        fill=fill_for(request),
    )


def fill_for(request: JobRequest) -> tuple[int, ...]:
    """The canvas around the fitted image: the job's background colour, white for effects
    whose background is a picture, clear for a transparent output."""
    if request.transparent:
        return CLEAR
    if request.effect == Effect.REMOVE:
        return parse_colour(request.background or "")
    return WHITE


def subject_box(alpha: np.ndarray, margin: float) -> Box | None:
    """The subject's bounding box grown on every side by `margin` × its longer side and
    clipped to the frame; None when no pixel is subject."""
    rows = np.flatnonzero(np.any(alpha > SUBJECT_ALPHA, axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(np.any(alpha[rows[0] : rows[-1] + 1] > SUBJECT_ALPHA, axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(columns[0]), int(columns[-1]) + 1
    pad = round(margin * max(right - left, bottom - top))
    height, width = alpha.shape[:2]
    return Box(
        max(0, left - pad), max(0, top - pad), min(width, right + pad), min(height, bottom + pad)
    )


def fitted_size(width: int, height: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The largest size of the same aspect within the canvas, never larger than the source."""
    scale = min(1.0, canvas[0] / width, canvas[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def frame(
    pixels: np.ndarray,
    alpha: np.ndarray,
    *,
    crop: bool,
    margin: float,
    size: tuple[int, int] | None,
    fill: tuple[int, ...],
) -> Framed:
    """Crop to the subject (when asked and there is one) and fit into a `size` canvas, centred,
    the rest `fill` (one value per channel of `pixels`) and alpha 0."""
    if crop:
        box = subject_box(alpha, margin)
        if box is not None:
            pixels = pixels[box.top : box.bottom, box.left : box.right]
            alpha = alpha[box.top : box.bottom, box.left : box.right]
    if size is None:
        return Framed(np.ascontiguousarray(pixels), np.ascontiguousarray(alpha))
    height, width = alpha.shape[:2]
    scaled = fitted_size(width, height, size)
    if scaled != (width, height):
        pixels, alpha = _shrink(pixels, alpha, scaled)
    canvas_w, canvas_h = size
    left, top = (canvas_w - scaled[0]) // 2, (canvas_h - scaled[1]) // 2
    if len(fill) != pixels.shape[2]:
        raise ValueError(f"fill {fill} does not match {pixels.shape[2]} channels")
    canvas = np.empty((canvas_h, canvas_w, pixels.shape[2]), np.uint8)
    canvas[:] = fill
    canvas_alpha = np.zeros((canvas_h, canvas_w), np.uint8)
    canvas[top : top + scaled[1], left : left + scaled[0]] = pixels
    canvas_alpha[top : top + scaled[1], left : left + scaled[0]] = alpha
    return Framed(canvas, canvas_alpha)


def _shrink(
    pixels: np.ndarray, alpha: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    small_alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    if pixels.shape[2] == 3:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), small_alpha
    # RGBA has straight alpha: averaging it as is would bleed the (invisible) colours of
    # transparent pixels into the subject's edge, so average premultiplied colours instead.
    weight = pixels[:, :, 3:].astype(np.float32) * (1 / 255)
    premultiplied = cv2.resize(
        pixels[:, :, :3].astype(np.float32) * weight, size, interpolation=cv2.INTER_AREA
    )
    coverage = cv2.resize(weight[:, :, 0], size, interpolation=cv2.INTER_AREA)[:, :, None]
    colour = premultiplied / np.maximum(coverage, 1e-6)
    rgb = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    return np.dstack([rgb, small_alpha]), small_alpha
