"""The guided-filter refinement Backdrop used before the matting solve, kept as a bench baseline.

DeepLabV3 predicts at 1/8 of its input resolution, so its mask is a smooth blob that misses
the subject's outline by several pixels. A colour guided filter (He et al., "Guided Image
Filtering") fits the mask locally as a linear function of the photo's colours, which moves
its transitions onto the colour edges. The "fast" variant (He & Sun, 2015) solves that fit at
a working resolution of about 0.4 megapixels and applies it at full resolution, so the cost of a
12 MP photo is one upsample and a few multiply-adds per pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

from worker.matting import inverse3
from worker.refine import _resize, checked_mask, uniform_alpha, working_inputs

# The fit is solved at most at this many pixels; larger photos use the upsampled solution.
WORKING_PIXELS = 400000
# Two passes, radii as shares of the working image's shorter side. The first pulls the
# model's wide, blurry transition towards the colour edges; its output is steepened by
# EDGE_GAIN around 0.5 (the model's blur, not the subject, made it wide); the second, a few
# pixels wide, gives the edge the photo's own soft profile, applied at full resolution.
COARSE_RADIUS_FRACTION = 0.008
FINE_RADIUS_FRACTION = 0.002
# Regularisation of the local fits (guide in 0..1 units): lower follows weaker colour edges.
COARSE_EPS = 1e-3
FINE_EPS = 1e-3
EDGE_GAIN = 2.0


def guided_filter_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Full-resolution (H, W) uint8 alpha from a low-res [0, 1] mask and the (H, W, 3) photo."""
    soft = checked_mask(soft, guide)
    # A constant mask has no edge to refine; the filter would only add rounding noise.
    uniform = uniform_alpha(soft, guide)
    if uniform is not None:
        return uniform
    small_guide, small_mask = working_inputs(soft, guide, WORKING_PIXELS)
    short_side = min(small_mask.shape)
    coarse_radius = max(1, round(COARSE_RADIUS_FRACTION * short_side))
    fine_radius = max(1, round(FINE_RADIUS_FRACTION * short_side))
    coeffs = _guided_coefficients(small_guide, small_mask, coarse_radius, COARSE_EPS)
    steep = _steepen(_evaluate(coeffs, small_guide))
    return _apply(_guided_coefficients(small_guide, steep, fine_radius, FINE_EPS), guide)


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return cv2.boxFilter(image, cv2.CV_32F, (size, size), borderType=cv2.BORDER_REFLECT)


def _guided_coefficients(
    guide: np.ndarray, mask: np.ndarray, radius: int, eps: float
) -> np.ndarray:
    """Per-pixel (a_r, a_g, a_b, b), window-averaged, so that mask ≈ a · guide + b."""
    mean_i = _box(guide, radius)
    mean_p = _box(mask, radius)
    # cov(I, p) per channel and the symmetric 3x3 colour covariance of each window.
    cov_ip = _box(guide * mask[:, :, None], radius) - mean_i * mean_p[:, :, None]
    channels = [guide[:, :, c] for c in range(3)]
    means = [mean_i[:, :, c] for c in range(3)]
    var = {}
    for i in range(3):
        for j in range(i, 3):
            var[i, j] = _box(channels[i] * channels[j], radius) - means[i] * means[j]
            if i == j:
                var[i, j] += eps
    i00, i01, i02, i11, i12, i22 = inverse3(var)
    r0, r1, r2 = cov_ip[:, :, 0], cov_ip[:, :, 1], cov_ip[:, :, 2]
    a = np.stack(
        [i00 * r0 + i01 * r1 + i02 * r2, i01 * r0 + i11 * r1 + i12 * r2,
         i02 * r0 + i12 * r1 + i22 * r2],
        axis=2,
    )  # fmt: skip
    b = mean_p - np.einsum("hwc,hwc->hw", a, mean_i)
    coeffs = np.concatenate([a, b[:, :, None]], axis=2)
    return _box(coeffs, radius)


def _evaluate(coeffs: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """a · I + b at the working resolution, I already float32 in 0..1."""
    q = cv2.transform(np.ascontiguousarray(coeffs[:, :, :3] * guide), np.ones((1, 3), np.float32))
    return q + coeffs[:, :, 3]


def _steepen(q: np.ndarray) -> np.ndarray:
    return np.clip((q - 0.5) * EDGE_GAIN + 0.5, 0.0, 1.0)


def _apply(coeffs: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """alpha = a · I + b at full resolution, with a and b upsampled bilinearly."""
    height, width = guide.shape[:2]
    full = _resize(coeffs, width, height)
    a = full[:, :, :3]
    q = cv2.multiply(np.ascontiguousarray(a), guide, dtype=cv2.CV_32F, scale=1 / 255)
    q = cv2.transform(q, np.ones((1, 3), np.float32)) + full[:, :, 3]
    return _to_bytes(q)


def _to_bytes(q: np.ndarray) -> np.ndarray:
    np.multiply(q, 255, out=q)
    np.add(q, 0.5, out=q)
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8)
