"""Mask refinement: the model's coarse soft mask turned into a full-resolution alpha matte.

DeepLabV3 sees a photo at 520 px and predicts at stride 8: about 65 mask cells along the long
side, whatever the photo's size. Its soft mask knows where the subject is, not where the edge
is. Everything below runs at a capped working resolution (WORKING_PIXELS):
  1. local colour models (Gaussians on the mask's grid, learnt from the sure subject and sure
     background around each pixel) give each pixel a likelihood ratio; where the pixels a
     whole-mask move (erosion, dilation, shift by up to a cell) would flip clearly agree with
     it, the mask is moved first (a model over- or under-reaching or misplacing the subject);
  2. in the mask's own transition band (cells neither ≈0 nor ≈1, not widened), colour moves
     the free reference's edge (the mask's 0.5 contour with a narrow linear ramp) where the
     two models differ clearly, and far more readily where the reference drops what the mask
     holds (strands and spokes thinner than a cell);
  3. closed-form matting (worker/matting.py) in a narrow strip around that edge gives it the
     photo's own soft profile;
  4. a consistency check against the mask on its own 65-cell grid: cells where the matte
     disagrees with the mask by more than CHECK_TOLERANCE fall back to the reference
     (colour-based matting fails where subject and background look alike);
  5. the matte reaches full resolution through a guided filter's local linear model (He & Sun,
     "Fast Guided Filter", 2015): a 12 MP photo costs one upsample, no full-size solve.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import cv2
import numpy as np

from worker.matting import (
    Backend,
    Laplacian,
    NumpyBackend,
    TorchBackend,
    WindowStats,
    solve_matte,
)
from worker.tiling import Tiling

WORKING_PIXELS = 300_000
MASK_CELLS = 65  # DeepLabV3's logits along the long side: ceil(520 / 8)
# The mask's own band: values strictly between these are unknown, the rest are known.
BAND_LOW, BAND_HIGH = 0.02, 0.98
# The free reference's ramp: 4 px per 1,200 px of the image's long side.
RAMP_SHARE = 4 / 1200
# Local colour models: statistics on a grid of COLOUR_CELLS along the long side, spread by a
# Gaussian of COLOUR_SIGMA of its cells; a pixel trusts its colour by the separation of the
# subject's and background's models (in units of their variance) over SEPARATION.
COLOUR_CELLS = 65
COLOUR_SIGMA = 1.0
# A second, wide Gaussian (FAR_SIGMA cells) with a small weight (FAR_SHARE) reaches the middle
# of a wide soft band (hair, spokes), where no sure pixel lies within a cell or two: near
# statistics dominate wherever they exist, the far ones fill in where they don't.
FAR_SIGMA = 6.0
FAR_SHARE = 0.1
COLOUR_NOISE = 1e-3
SEPARATION = 40.0
# A mask off by a cell or so (a model over-reaching, under-reaching or misplacing the subject)
# is moved first: eroded or dilated by MOVE_CELLS of its cells, or shifted by one cell, where
# the pixels that change side agree with the move by MOVE_EVIDENCE nats of the colour models'
# likelihood ratio on average (each pixel's clipped at EVIDENCE_CLIP). Where subject and
# background colours match, no move has that evidence and the mask stays as it is.
MOVE_CELLS = (0.5, 1.0)
MOVE_EVIDENCE = 0.3
EVIDENCE_CLIP = 4.0
# The subject's colour model also learns, with this weight, from where the mask is over 0.5
# but not sure (parts thinner than a cell); the background's does not (strands would
# contaminate it).
THIN_SEED = 0.3
# Where the reference itself disagrees with the mask on the mask's grid by more than
# NEED_OFFSET (strands and spokes thinner than a cell: the mask says "some subject here", its
# 0.5 contour drops it), only colour can say where the subject is; there colour is trusted
# from a separation of NEEDED_SEPARATION already, fully NEED_RAMP further.
NEED_OFFSET = 0.1
NEED_RAMP = 0.1
NEEDED_SEPARATION = 4.0
# The matting solve: a strip STRIP_RADIUS working pixels either side of the edge, solved in
# the SOLVE_TILE tiles that hold it (a one-subject photo's strip is ~2% of the grid, its
# bounding box nearer half).
STRIP_RADIUS = 2
SOLVE_TILE = 16
# One window radius for the solve and the upsampling, so the guide's window statistics are
# computed once for both.
WINDOW_RADIUS = 1
MATTING_EPS = 1e-5
PRIOR_WEIGHT = 0.02
ITERATIONS = 10
# The solve's edge steepened around 0.5: the true edge is a pixel or two wide, and textured
# subjects otherwise leave translucent patches in the strip.
STRIP_GAIN = 2.0
CHECK_TOLERANCE = 0.25
CHECK_RAMP = 0.15
UPSAMPLE_EPS = 1e-3
APPLY_ROWS = 64
# The guided model is fitted in tiles of UPSAMPLE_TILE working pixels that hold a pixel whose
# model is not trivially (0, 0, 0, matte) (see _live): a one-subject photo's edge crosses a
# fifth of them. Where over UPSAMPLE_TILED_SHARE of the grid would be tiled (tiles plus halos),
# the whole grid is fitted at once instead.
UPSAMPLE_TILE = 32
UPSAMPLE_TILED_SHARE = 0.7


def refine_mask(
    soft: np.ndarray, guide: np.ndarray, *, backend: Backend | None = None
) -> np.ndarray:
    """Full-resolution (H, W) uint8 alpha from a [0, 1] mask of any size and the (H, W, 3) photo.

    backend runs the matting solve and the full-resolution pass (default: numpy and OpenCV on
    this CPU; worker.matting.TorchBackend(device) runs them on a torch device).
    """
    soft = checked_mask(soft, guide)
    uniform = uniform_alpha(soft, guide)
    if uniform is not None:
        return uniform
    small_guide, mask = working_inputs(soft, guide)
    mask = np.clip(mask, 0.0, 1.0)
    squares = _channel_sum(np.square(small_guide))
    llr, separation = colour_evidence(small_guide, mask, squares)
    moved = moved_mask(mask, llr)
    if moved is not mask:
        mask = moved
        llr, separation = colour_evidence(small_guide, mask, squares)
    reference = reference_alpha(mask)
    band = (mask > BAND_LOW) & (mask < BAND_HIGH)
    coloured = np.where(band, colour_alpha(llr, separation, mask, reference), reference)
    backend = backend or NumpyBackend()
    channels = np.ascontiguousarray(small_guide.transpose(2, 0, 1))
    matte = matte_strip(channels, checked(coloured, mask, reference), backend)
    matte = checked(matte, mask, reference)
    live = _live(matte)
    model = guided_model(channels, matte, live, backend)
    if isinstance(backend, TorchBackend):
        return _apply_on_device(backend.asarray(model.transpose(2, 0, 1)), guide, backend)
    return _apply(model, guide, live)


def checked_mask(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """soft as contiguous float32, once the shapes are an (h, w) mask and an (H, W, 3) photo."""
    if soft.ndim != 2 or guide.ndim != 3 or guide.shape[2] != 3:
        raise ValueError(
            f"expected (h, w) mask and (H, W, 3) guide, got {soft.shape}, {guide.shape}"
        )
    return np.ascontiguousarray(soft, dtype=np.float32)


def uniform_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray | None:
    """The photo-sized alpha of a mask with one value everywhere (no edge to refine), else None."""
    low, high = float(soft.min()), float(soft.max())
    if high - low >= 1e-6:
        return None
    return np.full(guide.shape[:2], _to_byte(low), np.uint8)


def working_inputs(
    soft: np.ndarray, guide: np.ndarray, pixels: int = WORKING_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """The photo (float32, 0..1) and the mask, both at working_size (`pixels` at most)."""
    height, width = guide.shape[:2]
    work_w, work_h = working_size(width, height, pixels)
    small_guide = _resize(guide, work_w, work_h).astype(np.float32) * (1 / 255)
    return small_guide, _resize(soft, work_w, work_h)


def working_size(width: int, height: int, pixels: int = WORKING_PIXELS) -> tuple[int, int]:
    """The (width, height) the matte is solved at: the photo's own, capped at `pixels`."""
    scale = min(1.0, (pixels / (width * height)) ** 0.5)
    return max(1, round(width * scale)), max(1, round(height * scale))


def reference_alpha(mask: np.ndarray) -> np.ndarray:
    """The free reference at the mask's size: its 0.5 contour with a RAMP_SHARE-wide ramp."""
    ramp = max(RAMP_SHARE * max(mask.shape), 1e-3)
    gx = cv2.Sobel(mask, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(mask, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    slope = np.maximum(np.sqrt(gx * gx + gy * gy) * ramp, 1e-4)
    result: np.ndarray = np.clip(0.5 + (mask - 0.5) / slope, 0.0, 1.0)
    return result


def colour_evidence(
    guide: np.ndarray, mask: np.ndarray, squares: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the log-likelihood ratio of its colour under the local subject and background
    models, and the two models' separation (squared distance of means over summed variances);
    both 0 where either model has no pixels to learn from. `squares`: the guide's sum of
    squared channels per pixel, where the caller has it already."""
    if squares is None:
        squares = _channel_sum(np.square(guide))
    # Thin parts (bars, legs) never reach BAND_HIGH: their own upper half seeds them weakly.
    sure_fg = (mask >= BAND_HIGH) + THIN_SEED * np.clip((mask - 0.5) * 2, 0.0, 1.0)
    sure_fg = sure_fg.astype(np.float32)
    sure_bg = (mask <= BAND_LOW).astype(np.float32)
    mean_f, var_f, seen_f = _local_model(guide, squares, sure_fg)
    mean_b, var_b, seen_b = _local_model(guide, squares, sure_bg)
    dist_f = _channel_sum(np.square(guide - mean_f))
    dist_b = _channel_sum(np.square(guide - mean_b))
    # Isotropic Gaussians.
    llr = dist_b / (2 * var_b) - dist_f / (2 * var_f) + 1.5 * np.log(var_b / var_f)
    separation = _channel_sum(np.square(mean_f - mean_b)) / (var_f + var_b)
    seen = (seen_f > 1e-3) & (seen_b > 1e-3)
    return llr * seen, separation * seen


def moved_mask(mask: np.ndarray, llr: np.ndarray) -> np.ndarray:
    """The mask, or the one move of it (see MOVE_CELLS) whose flipped pixels' colours agree
    with it by more than MOVE_EVIDENCE on average and most in total."""
    evidence = np.clip(llr, -EVIDENCE_CLIP, EVIDENCE_CLIP)
    # Moves are scored on the 0.5 contour's inside: morphology and shifts commute with a
    # threshold, and uint8 arrays are several times faster to move than float ones.
    inside = (mask > 0.5).astype(np.uint8)
    inside_total = _sum_where(evidence, inside)
    best, best_total = None, 0.0
    for move in _moves(mask.shape):
        candidate = move(inside)
        flipped = cv2.countNonZero(cv2.bitwise_xor(candidate, inside))
        total = _sum_where(evidence, candidate) - inside_total
        if flipped and total / flipped >= MOVE_EVIDENCE and total > best_total:
            best, best_total = move, total
    return mask if best is None else best(mask)


def _moves(shape: tuple[int, ...]) -> list[Callable[[np.ndarray], np.ndarray]]:
    """Erosions and dilations by each of MOVE_CELLS, and shifts by one cell each way."""
    height, width = shape[:2]
    cell = max(height, width) / MASK_CELLS
    moves: list[Callable[[np.ndarray], np.ndarray]] = []
    for cells in MOVE_CELLS:
        size = 2 * max(1, round(cells * cell)) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        moves += [partial(cv2.erode, kernel=kernel), partial(cv2.dilate, kernel=kernel)]
    step = round(cell)
    for dx in (-step, 0, step):
        for dy in (-step, 0, step):
            if dx or dy:
                moves.append(partial(shifted, dx=dx, dy=dy))
    return moves


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """image moved by whole pixels (dx right, dy down), its edge rows and columns repeated
    into the space it leaves, as warpAffine with BORDER_REPLICATE does: a crop and a border,
    ~20x cheaper."""
    height, width = image.shape[:2]
    # Past width - 1 every column is already the edge one: a longer move changes nothing.
    dx, dy = max(1 - width, min(width - 1, dx)), max(1 - height, min(height - 1, dy))
    kept = image[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
    moved: np.ndarray = cv2.copyMakeBorder(
        kept, max(0, dy), max(0, -dy), max(0, dx), max(0, -dx), cv2.BORDER_REPLICATE
    )
    return moved


def _sum_where(x: np.ndarray, where: np.ndarray) -> float:
    count = cv2.countNonZero(where)
    return cv2.mean(x, mask=where)[0] * count if count else 0.0


def colour_alpha(
    llr: np.ndarray, separation: np.ndarray, mask: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Subject probability from colour and the mask's prior, trusted where colours separate."""
    odds = np.clip(mask, 1e-3, 1 - 1e-3)
    ratio = llr + np.log(odds / (1 - odds))  # the mask's own log-odds as the prior
    probability = 1 / (1 + np.exp(-np.clip(ratio, -30, 30)))
    trust = np.maximum(
        np.clip(separation / SEPARATION, 0.0, 1.0),
        need(mask, reference) * np.clip(separation / NEEDED_SEPARATION, 0.0, 1.0),
    )
    result: np.ndarray = reference + trust * (probability - reference)
    return result


def need(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """0..1: how much the reference misses of the mask, on the mask's grid (see NEED_OFFSET)."""
    missed = np.abs(_on_cells(reference, mask.shape) - _on_cells(mask, mask.shape))
    need = np.clip((missed - NEED_OFFSET) / NEED_RAMP, 0.0, 1.0)
    result: np.ndarray = cv2.resize(need, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return result


def _on_cells(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """x area-averaged onto the mask's grid of MASK_CELLS along the long side."""
    height, width = shape[:2]
    scale = min(1.0, MASK_CELLS / max(height, width))
    cells = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(x, cells, interpolation=cv2.INTER_AREA)


def _local_model(
    guide: np.ndarray, squares: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Weighted local colour mean, isotropic variance and weight, on a coarse grid."""
    height, width = weight.shape
    scale = min(1.0, COLOUR_CELLS / max(height, width))
    cells = (max(1, round(width * scale)), max(1, round(height * scale)))
    seen = cv2.resize(weight, cells, interpolation=cv2.INTER_AREA)
    first = cv2.resize(guide * weight[:, :, None], cells, interpolation=cv2.INTER_AREA)
    second = cv2.resize(squares * weight, cells, interpolation=cv2.INTER_AREA)
    seen, first, second = (_spread(x) for x in (seen, first, second))
    mean = first / np.maximum(seen, 1e-6)[:, :, None]
    var = np.maximum(second / np.maximum(seen, 1e-6) - _channel_sum(np.square(mean)), 0) / 3
    var += COLOUR_NOISE

    def up(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR)

    return up(mean), up(var), up(seen)


def _spread(x: np.ndarray) -> np.ndarray:
    near = cv2.GaussianBlur(x, (0, 0), COLOUR_SIGMA)
    return near + FAR_SHARE * cv2.GaussianBlur(x, (0, 0), FAR_SIGMA)


def matte_strip(channels: np.ndarray, alpha: np.ndarray, backend: Backend) -> np.ndarray:
    """Closed-form matting in a strip around alpha's 0.5 contour; outside it alpha is 0 or 1.

    channels is the working guide, channel-first (3, h, w) in 0..1.
    """
    inside = (alpha > 0.5).astype(np.uint8)
    size = 2 * STRIP_RADIUS + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    strip = cv2.dilate(inside, kernel) > cv2.erode(inside, kernel)
    if not strip.any():
        return inside.astype(np.float32)
    prior = np.where(strip, alpha, inside).astype(np.float32)
    rows, cols = _bounding_box(strip, 2 * WINDOW_RADIUS + 1)
    tiles = Tiling.covering(strip, SOLVE_TILE, 2 * WINDOW_RADIUS)
    box_pixels = (rows.stop - rows.start) * (cols.stop - cols.start)
    tiling = tiles if tiles.pixels < box_pixels else None
    if tiling is not None:
        stats = WindowStats.of(tiling.gather(channels), WINDOW_RADIUS, backend, tiling.valid)
        known, given = 1.0 - tiling.gather(strip.astype(np.float32)), tiling.gather(prior)
    else:
        # The strip's bounding box, with a margin that makes it exact (see WindowStats.crop):
        # the strip's tiles would cover more (a mask of many small blobs).
        stats = _window_stats(channels, rows, cols, backend)
        known, given = (~strip[rows, cols]).astype(np.float32), prior[rows, cols]
    solved = solve_matte(
        stats,
        known,
        given,
        eps=MATTING_EPS,
        weight=PRIOR_WEIGHT,
        iterations=ITERATIONS,
        tiling=tiling,
    )
    matte = prior.copy()
    if tiling is None:
        matte[rows, cols] = solved
    else:
        tiling.scatter(solved, matte)
    result: np.ndarray = np.clip((matte - 0.5) * STRIP_GAIN + 0.5, 0.0, 1.0).astype(np.float32)
    return result


def _window_stats(channels: np.ndarray, rows: slice, cols: slice, backend: Backend) -> WindowStats:
    """The guide's window statistics in rows x cols, from the guide within a window of them:
    the same as the whole grid's, cropped, at a crop's cost."""
    height, width = channels.shape[1:]
    reach = WINDOW_RADIUS
    outer_rows = slice(max(0, rows.start - reach), min(height, rows.stop + reach))
    outer_cols = slice(max(0, cols.start - reach), min(width, cols.stop + reach))
    stats = WindowStats.of(channels[:, outer_rows, outer_cols], WINDOW_RADIUS, backend)
    return stats.crop(
        slice(rows.start - outer_rows.start, rows.stop - outer_rows.start),
        slice(cols.start - outer_cols.start, cols.stop - outer_cols.start),
    )


def _live(matte: np.ndarray) -> np.ndarray:
    """Where the guided model of matte is not exactly (0, 0, 0, matte): within two window
    radii (a window of windows) of a pixel that is not the same 0 or 1 as its neighbours."""
    size = 4 * WINDOW_RADIUS + 1
    kernel = np.ones((size, size), np.uint8)
    # Erosion's border is the maximum: pixels past the image's edge never make one live.
    zero = cv2.erode((matte == 0).astype(np.uint8), kernel)
    one = cv2.erode((matte == 1).astype(np.uint8), kernel)
    result: np.ndarray = cv2.bitwise_or(zero, one) == 0
    return result


def guided_model(
    channels: np.ndarray, matte: np.ndarray, live: np.ndarray, backend: Backend
) -> np.ndarray:
    """(h, w, 4): the guided filter's (a_r, a_g, a_b, b) of matte on the working guide,
    (0, 0, 0, matte) away from live pixels, fitted only in the tiles that hold live ones."""
    height, width = matte.shape
    model = np.zeros((4, height, width), np.float32)
    model[3] = matte
    # Two window radii of halo: the model averages windows that average pixels.
    tiling = Tiling.covering(live, UPSAMPLE_TILE, 2 * WINDOW_RADIUS)
    if 0 < tiling.pixels <= UPSAMPLE_TILED_SHARE * height * width:
        stats = WindowStats.of(tiling.gather(channels), WINDOW_RADIUS, backend, tiling.valid)
        laplacian = Laplacian.from_stats(stats, UPSAMPLE_EPS)
        fitted = laplacian.linear_model(backend.asarray(tiling.gather(matte)))
        tiling.scatter(backend.to_numpy(fitted), model)
    elif tiling.pixels:
        stats = WindowStats.of(channels, WINDOW_RADIUS, backend)
        fitted = Laplacian.from_stats(stats, UPSAMPLE_EPS).linear_model(backend.asarray(matte))
        model = backend.to_numpy(fitted)
    return np.ascontiguousarray(model.transpose(1, 2, 0))


def _bounding_box(where: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The rows and columns holding where's true pixels, widened by margin (within bounds)."""
    x, y, width, height = cv2.boundingRect(where.astype(np.uint8))
    return (
        slice(max(0, y - margin), min(where.shape[0], y + height + margin)),
        slice(max(0, x - margin), min(where.shape[1], x + width + margin)),
    )


def checked(matte: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The matte, with the reference wherever it disagrees with the mask on the mask's grid."""
    disagreement = np.abs(_on_cells(matte, mask.shape) - _on_cells(mask, mask.shape))
    rejected = np.clip((disagreement - CHECK_TOLERANCE) / CHECK_RAMP, 0.0, 1.0)
    rejected = cv2.resize(rejected, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    result: np.ndarray = matte + rejected * (reference - matte)
    return result


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _apply(coeffs: np.ndarray, guide: np.ndarray, live: np.ndarray) -> np.ndarray:
    """alpha = a · I + b at full resolution, with a and b upsampled bilinearly.

    (a, b) · (I, 255) / 255 per pixel, APPLY_ROWS rows at a time: the float products of a
    band stay in cache instead of passing through memory as full-resolution planes. Only
    between the band's first and last live working columns: either side of them the model is
    (0, 0, 0, one 0 or 1) and alpha that 0 or 255, so only that span is upsampled (see
    _upsampled)."""
    height, width = guide.shape[:2]
    alpha = np.empty((height, width), np.uint8)
    to_bytes = np.full((1, 4), 255, np.float32)
    for top in range(0, height, APPLY_ROWS):
        bottom = min(height, top + APPLY_ROWS)
        reads = _working_span(top, bottom, height, live.shape[0])
        first, last = _live_span(live[reads])
        if first > last:  # nothing live: the band is one trivial 0 or 1
            alpha[top:bottom] = _trivial_byte(coeffs[reads.start, 0])
            continue
        left = max(0, _full_index(first - 1, width, live.shape[1]) - 1)
        right = min(width, _full_index(last + 1, width, live.shape[1]) + 2)
        alpha[top:bottom, :left] = _trivial_byte(coeffs[reads.start, 0])
        alpha[top:bottom, right:] = _trivial_byte(coeffs[reads.start, -1])
        rows = guide[top:bottom, left:right]
        opaque = np.full(rows.shape[:2], 255, np.uint8)
        products = cv2.multiply(
            _upsampled(coeffs, (height, width), rows.shape[:2], (top, left)),
            cv2.merge([*cv2.split(rows), opaque]),
            dtype=cv2.CV_32F,
            scale=1 / 255,
        )
        q = cv2.transform(products, to_bytes)
        np.add(q, 0.5, out=q)
        np.clip(q, 0, 255, out=q)
        alpha[top:bottom, left:right] = q
    return alpha


def _upsampled(
    small: np.ndarray, full: tuple[int, int], size: tuple[int, int], origin: tuple[int, int]
) -> np.ndarray:
    """The (size) block at origin of small bilinearly upsampled to full (height, width):
    cv2.resize's pixel-centre alignment and edge clamping, without resizing the whole plane
    (the live spans are a third to two thirds of a photo). warpAffine places its samples to
    1/32 of a working pixel, which moves a coefficient by ~1e-4 of its range at most."""
    scale_y, scale_x = small.shape[0] / full[0], small.shape[1] / full[1]
    top, left = origin
    to_small = np.array(
        [
            [scale_x, 0.0, (left + 0.5) * scale_x - 0.5],
            [0.0, scale_y, (top + 0.5) * scale_y - 0.5],
        ]
    )
    block: np.ndarray = cv2.warpAffine(
        small,
        to_small,
        size[::-1],
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return block


def _working_span(first: int, stop: int, full: int, working: int) -> slice:
    """The working rows (or columns) a bilinear upsample reads for full ones first..stop-1,
    with one to spare either side."""
    scale = working / full
    low = int(np.floor((first + 0.5) * scale - 0.5)) - 1
    high = int(np.floor((stop - 0.5) * scale - 0.5)) + 3
    return slice(max(0, low), min(working, high))


def _live_span(live: np.ndarray) -> tuple[int, int]:
    """The first and last columns holding a live pixel; (1, 0) where none does."""
    columns = np.flatnonzero(live.any(axis=0))
    return (int(columns[0]), int(columns[-1])) if columns.size else (1, 0)


def _full_index(working_index: float, full: int, working: int) -> int:
    """The full-resolution pixel whose bilinear sample lands on working_index (rounded down)."""
    return int(np.floor((working_index + 0.5) * full / working - 0.5))


def _trivial_byte(coefficients: np.ndarray) -> int:
    """The alpha of a trivial model (0, 0, 0, b), b being 0 or 1 give or take rounding."""
    return 255 if coefficients[3] > 0.5 else 0


def _apply_on_device(model: Any, guide: np.ndarray, backend: TorchBackend) -> np.ndarray:
    """_apply on the backend's device, model a (4, h, w) tensor there already: the
    full-resolution pass is the costliest part on a host."""
    import torch
    import torch.nn.functional as functional

    height, width = guide.shape[:2]
    small = model[None]
    # align_corners=False samples at pixel centres, as cv2.INTER_LINEAR does.
    full = functional.interpolate(small, (height, width), mode="bilinear", align_corners=False)[0]
    image = torch.from_numpy(guide).to(backend.device).permute(2, 0, 1).float() * (1 / 255)
    q = (full[:3] * image).sum(0) + full[3]
    return (q * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def _channel_sum(x: np.ndarray) -> np.ndarray:
    """x[..., 0] + x[..., 1] + x[..., 2]; numpy's sum over a last axis of 3 is ~10x slower."""
    return cv2.transform(np.ascontiguousarray(x, dtype=np.float32), np.ones((1, 3), np.float32))


def _to_byte(value: float) -> int:
    return int(min(max(value, 0.0), 1.0) * 255 + 0.5)
