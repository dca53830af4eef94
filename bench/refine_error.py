"""Edge quality: refine_mask against the tutorial, a free reference and the old guided filter.

Each case composites one real photo (scikit-image's) over another through a known soft matte
(a real or drawn silhouette with a soft edge of sigma 1.5 full-resolution pixels, hair-like
strands and thin bars included), degrades that matte the way Backdrop's DeepLabV3 sees it,
and scores every method's alpha against the truth.

The model's degradation follows worker/segmenter.py and torchvision: the photo's long side at
520 px, logits at output stride 8 (ceil(520 / 8) = 65 cells, modelled by area-averaging the
truth), upsampled bilinearly back to the ~520 px map the segmenter returns. "dilated" and
"shifted" cases grow the truth by one such cell or move it by one cell before degrading, as a
model that over-reaches or misplaces the subject would.

Methods:
  tutorial   LearnOpenCV's decode_segmap: threshold at 0.5, 7x7 Gaussian at the map's size,
             cv2.resize (bilinear) to the photo.
  reference  free, no image work: the map upsampled bilinearly, then a 0.5 threshold with a
             linear ramp 4 px wide per 1,200 px of the photo's long side.
  guided     the guided filter Backdrop shipped before (bench/support/guided_filter.py).
  ours       worker.refine.refine_mask.
Alpha errors (SAD, MSE, gradient error: Gaussian-derivative gradients, sigma 1.4, as in
Rhemann et al.'s alphamatting.com) are printed as ratios to the tutorial and to the reference.
Composite error: each alpha composites the photo's own RGB (as the tutorial does) over a new
flat background, against the true subject composited with the true alpha; "ours+fg" uses
worker.foreground.estimate_foreground's colours instead. Cost: CPU seconds per megapixel on
one core (OpenCV and torch held to one thread, time.process_time).

Tuning cases are what refine.py's constants were chosen on; held-out cases (other photos,
other silhouettes) were only ever run to report them.
Run: .venv/bin/python bench/refine_error.py [--quick] [--picture docs/edge-crops.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.guided_filter import guided_filter_alpha
from worker.refine import refine_mask

SKIMAGE_DATA = Path(skimage.data.__file__).parent
MODEL_LONG_SIDE = 520  # worker/segmenter.py letterboxes the long side to this
OUTPUT_STRIDE = 8  # DeepLabV3's logits are at 1/8 of its input
EDGE_SIGMA = 1.5  # the true matte's soft edge, in full-resolution pixels
RAMP_SHARE = 4 / 1200  # the reference's ramp width per pixel of the photo's long side
SIZES = {"2MP": (1632, 1224), "12MP": (4000, 3000)}
NEW_BACKGROUND = np.array([40, 190, 90], np.float32)  # a flat green the photos do not contain


@dataclass(frozen=True)
class Case:
    name: str
    guide: np.ndarray  # (H, W, 3) uint8 composite
    front: np.ndarray  # (H, W, 3) float32 the true subject colours
    truth: np.ndarray  # (H, W) float32 alpha in 0..1
    soft: np.ndarray  # (h, w) float32 what the model would hand refine_mask


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as RGB; "name~" is it mirrored (a lookalike background)."""
    mirrored = name.endswith("~")
    stem = name.rstrip("~")
    (path,) = SKIMAGE_DATA.glob(f"{stem}.[pj][np]g")
    image = np.asarray(Image.open(path).convert("RGB"))
    if stem == "grass":  # a grey texture: tint it like a lawn
        image = (image * np.array([0.45, 0.85, 0.3])).astype(np.uint8)
    return np.ascontiguousarray(image[:, ::-1]) if mirrored else image


# --- silhouettes: each draws a hard (H, W) float32 shape at the frame's size ----------------


def _raster(shape: np.ndarray, width: int, height: int, share: float = 0.8) -> np.ndarray:
    """A raster silhouette scaled to fit `share` of the frame, centred."""
    scale = share * min(height / shape.shape[0], width / shape.shape[1])
    target_h, target_w = int(shape.shape[0] * scale), int(shape.shape[1] * scale)
    scaled = cv2.resize(shape.astype(np.float32), (target_w, target_h))
    canvas = np.zeros((height, width), np.float32)
    top, left = (height - target_h) // 2, (width - target_w) // 2
    canvas[top : top + target_h, left : left + target_w] = scaled > 0.5
    return canvas


def horse(width: int, height: int) -> np.ndarray:
    return _raster(~skimage.data.horse(), width, height)


def cameraman(width: int, height: int) -> np.ndarray:
    """The dark coat, camera and tripod of the cameraman: a thresholded photo region."""
    grey = cv2.GaussianBlur(skimage.data.camera(), (0, 0), 3)
    _, labels, stats, _ = cv2.connectedComponentsWithStats((grey < 40).astype(np.uint8))
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return _raster(labels == largest, width, height)


def coins(width: int, height: int) -> np.ndarray:
    """The coins of the bottom three rows of scikit-image's coins photo, engravings filled."""
    grey = cv2.GaussianBlur(skimage.data.coins()[85:], (0, 0), 2)
    _, bright = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = cv2.morphologyEx(bright, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    flood = np.pad(bright, 1).copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return _raster(bright | (1 - flood[1:-1, 1:-1]), width, height)


def _px(value: float, width: int) -> int:
    """A length given per 1,000 px of frame width, at this frame's width."""
    return max(1, round(value * width / 1000))


def hair(width: int, height: int) -> np.ndarray:
    """A head whose outline sprouts wavy strands 1-3 px wide (per 1,000 px), like loose hair."""
    canvas = np.zeros((height, width), np.uint8)
    centre = (width // 2, int(height * 0.62))
    axes = (int(width * 0.2), int(height * 0.33))
    cv2.ellipse(canvas, centre, axes, 0, 0, 360, 1, -1)
    cv2.rectangle(
        canvas, (int(width * 0.25), int(height * 0.85)), (int(width * 0.75), height), 1, -1
    )
    rng = np.random.default_rng(7)
    for _ in range(70):
        angle = rng.uniform(np.pi * 1.05, np.pi * 1.95)
        x = centre[0] + axes[0] * np.cos(angle) * 0.97
        y = centre[1] + axes[1] * np.sin(angle) * 0.97
        heading, length = angle + rng.normal(0, 0.3), rng.uniform(0.08, 0.22) * width
        points = []
        for _ in range(40):
            points.append((x, y))
            heading += rng.normal(0, 0.08)
            x += np.cos(heading) * length / 40
            y += np.sin(heading) * length / 40
        line = np.round(np.array(points) * 8).astype(np.int32)  # 3 fractional bits
        thick = _px(rng.uniform(1.0, 3.0), width)
        cv2.polylines(canvas, [line], False, 1, thick, cv2.LINE_AA, shift=3)
    return canvas.astype(np.float32)


def bicycle(width: int, height: int) -> np.ndarray:
    """Two wheels with thin spokes, a frame of bars: thin structures on a thin outline."""
    canvas = np.zeros((height, width), np.uint8)
    radius = int(height * 0.25)
    wheels = [(int(width * 0.28), int(height * 0.65)), (int(width * 0.72), int(height * 0.65))]
    for cx, cy in wheels:
        cv2.circle(canvas, (cx, cy), radius, 1, _px(14, width), cv2.LINE_AA)
        for k in range(12):
            angle = k * np.pi / 6
            end = (int(cx + radius * np.cos(angle)), int(cy + radius * np.sin(angle)))
            cv2.line(canvas, (cx, cy), end, 1, _px(2.5, width), cv2.LINE_AA)
    seat, bar = (int(width * 0.45), int(height * 0.3)), (int(width * 0.68), int(height * 0.3))
    for start, end in [(wheels[0], seat), (seat, bar), (bar, wheels[1]), (seat, wheels[1])]:
        cv2.line(canvas, start, end, 1, _px(9, width), cv2.LINE_AA)
    return canvas.astype(np.float32)


def portrait(width: int, height: int) -> np.ndarray:
    """Head and shoulders cut by the bottom and left edges of the frame."""
    canvas = np.zeros((height, width), np.uint8)
    cv2.ellipse(
        canvas,
        (int(width * 0.3), int(height * 0.38)),
        (int(width * 0.16), int(height * 0.27)),
        0,
        0,
        360,
        1,
        -1,
    )
    shoulders = np.array(
        [[0, height * 0.62], [width * 0.55, height * 0.72], [width * 0.7, height], [0, height]]
    )
    cv2.fillPoly(canvas, [shoulders.astype(np.int32)], 1)
    return canvas.astype(np.float32)


def hand(width: int, height: int) -> np.ndarray:
    """A palm and five fingers rising from the bottom edge of the frame."""
    canvas = np.zeros((height, width), np.uint8)
    cv2.ellipse(
        canvas,
        (width // 2, int(height * 0.75)),
        (int(width * 0.16), int(height * 0.22)),
        0,
        0,
        360,
        1,
        -1,
    )
    cv2.rectangle(canvas, (int(width * 0.4), int(height * 0.8)), (int(width * 0.6), height), 1, -1)
    for k, (dx, top) in enumerate(
        [(-0.13, 0.38), (-0.065, 0.2), (0.0, 0.15), (0.065, 0.2), (0.15, 0.55)]
    ):
        x = int(width * (0.5 + dx))
        bottom = (x + (k == 4) * int(width * 0.05), int(height * 0.7))
        cv2.line(canvas, (x, int(height * top)), bottom, 1, _px(45 if k else 40, width))
    return canvas.astype(np.float32)


SILHOUETTES: dict[str, Callable[[int, int], np.ndarray]] = {
    "horse": horse, "cameraman": cameraman, "coins": coins, "hair": hair,
    "bicycle": bicycle, "portrait": portrait, "hand": hand,
}  # fmt: skip


# --- the model's view of a matte ---------------------------------------------------------------


def model_view(truth: np.ndarray, change: str = "") -> np.ndarray:
    """The matte as the segmenter hands it over: stride-8 logits upsampled to the model input.

    change "dilated" grows the matte by one logit cell first, "shifted" moves it by one cell
    right and down: a model over-reaching or misplacing the subject by a cell; "half-dilated"
    grows it on the left half of the frame only (over-reaching in one place). "eroded" (shrunk
    by a cell: the under-reaching twin of "dilated") and "skewed" (moved 1.5 cells left and half
    a cell down: not a move refine_mask tries) are held out.
    """
    height, width = truth.shape
    scale = MODEL_LONG_SIDE / max(height, width)
    model_w, model_h = max(1, round(width * scale)), max(1, round(height * scale))
    cell = round(OUTPUT_STRIDE / scale)
    if change in ("dilated", "half-dilated"):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cell + 1, 2 * cell + 1))
        grown = cv2.dilate(truth, kernel)
        if change == "half-dilated":  # over-reaching on the left half of the frame only
            grown[:, width // 2 :] = truth[:, width // 2 :]
        truth = grown
    elif change == "eroded":
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cell + 1, 2 * cell + 1))
        truth = cv2.erode(truth, kernel)
    elif change in ("shifted", "skewed"):
        dx, dy = (cell, cell) if change == "shifted" else (-1.5 * cell, 0.5 * cell)
        truth = cv2.warpAffine(truth, np.float32([[1, 0, dx], [0, 1, dy]]), (width, height))
    model_input = cv2.resize(truth, (model_w, model_h), interpolation=cv2.INTER_AREA)
    logits_size = (-(-model_w // OUTPUT_STRIDE), -(-model_h // OUTPUT_STRIDE))
    coarse = cv2.resize(model_input, logits_size, interpolation=cv2.INTER_AREA)
    return cv2.resize(coarse, (model_w, model_h), interpolation=cv2.INTER_LINEAR)


def fitted(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A photo scaled to cover the frame (cubic when enlarging)."""
    scale = max(width / image.shape[1], height / image.shape[0])
    size = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    big = cv2.resize(image, size, interpolation=interpolation)
    top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    return big[top : top + height, left : left + width]


@dataclass(frozen=True)
class Plan:
    front: str
    back: str
    silhouette: str
    size: str
    change: str = ""
    note: str = ""

    @property
    def name(self) -> str:
        extra = f" {self.change}" if self.change else ""
        return f"{self.front}/{self.back} {self.silhouette} {self.size}{extra}"


def make_case(plan: Plan) -> Case:
    width, height = SIZES[plan.size]
    truth = cv2.GaussianBlur(SILHOUETTES[plan.silhouette](width, height), (0, 0), EDGE_SIGMA)
    front = fitted(photo(plan.front), width, height).astype(np.float32)
    back = fitted(photo(plan.back), width, height).astype(np.float32)
    a = truth[:, :, None]
    guide = np.clip(front * a + back * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    return Case(plan.name, guide, front, truth, model_view(truth, plan.change))


# "~" marks a mirrored photo: subject and background then share every colour.
TUNING = [
    Plan("astronaut", "coffee", "horse", "2MP"),
    Plan("chelsea", "motorcycle_left", "cameraman", "2MP"),
    Plan("chelsea", "rocket", "hair", "2MP", note="strands"),
    Plan("motorcycle_left", "astronaut", "bicycle", "2MP", note="thin"),
    Plan("coffee", "coffee~", "portrait", "2MP", note="same colours, frame"),
    Plan("grass", "grass~", "hair", "2MP", note="same colours"),
    Plan("astronaut", "coffee", "horse", "2MP", "dilated"),
    Plan("chelsea", "motorcycle_left", "cameraman", "2MP", "shifted"),
    # Added with the mask moves: a model over-reaching in one place only.
    Plan("chelsea", "motorcycle_left", "cameraman", "2MP", "half-dilated"),
    Plan("astronaut", "coffee", "horse", "12MP"),
    Plan("chelsea", "rocket", "hair", "12MP", note="strands"),
    Plan("coffee", "coffee~", "portrait", "12MP", note="same colours, frame"),
]
HELD_OUT = [
    Plan("ihc", "rocket", "coins", "2MP"),
    Plan("motorcycle_left", "motorcycle_right", "coins", "2MP", note="same colours"),
    Plan("astronaut", "brick", "hand", "2MP", "dilated", note="frame"),
    Plan("coffee", "chelsea", "hand", "12MP", note="frame"),
    # Added with the mask moves (worker/refine.py moved_mask), never tuned on.
    Plan("chelsea", "brick", "portrait", "2MP", "eroded", note="frame"),
    Plan("astronaut", "rocket", "cameraman", "2MP", "skewed"),
    Plan("ihc", "brick", "hand", "2MP", "half-dilated", note="frame"),
]


# --- methods ---------------------------------------------------------


def tutorial_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """LearnOpenCV's decode_segmap: hard threshold, 7x7 Gaussian at map size, resized up."""
    blurred = cv2.GaussianBlur((soft > 0.5).astype(np.float32), (7, 7), 0)
    return cv2.resize(blurred, guide.shape[1::-1], interpolation=cv2.INTER_LINEAR)


def reference_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Bilinear upsample, then the 0.5 contour with a linear ramp RAMP_SHARE of the long side."""
    height, width = guide.shape[:2]
    up = cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR)
    gx = cv2.Sobel(up, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(up, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    slope = np.maximum(np.sqrt(gx * gx + gy * gy) * RAMP_SHARE * max(width, height), 1e-4)
    return np.clip(0.5 + (up - 0.5) / slope, 0.0, 1.0)


def guided_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    return guided_filter_alpha(soft, guide).astype(np.float32) / 255


def our_alpha(soft: np.ndarray, guide: np.ndarray) -> np.ndarray:
    return refine_mask(soft, guide).astype(np.float32) / 255


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "tutorial": tutorial_alpha,
    "reference": reference_alpha,
    "guided": guided_alpha,
    "ours": our_alpha,
}


# --- scoring ---------------------------------------------------------


def gradient(alpha: np.ndarray) -> np.ndarray:
    smooth = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), 1.4)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
    return np.sqrt(gx * gx + gy * gy)


def composite(colours: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[:, :, None]
    return colours.astype(np.float32) * a + NEW_BACKGROUND * (1 - a)


@dataclass
class Scores:
    sad: float
    mse: float
    grad: float
    comp: float
    seconds_per_mp: float
    comp_fg: float | None = None


def score(case: Case, method: str, truth_grad: np.ndarray, truth_comp: np.ndarray) -> Scores:
    started = time.process_time()
    alpha = METHODS[method](case.soft, case.guide)
    seconds = time.process_time() - started
    megapixels = case.truth.size / 1e6
    diff = alpha.astype(np.float64) - case.truth
    grad_diff = gradient(alpha) - truth_grad
    comp = float(np.abs(composite(case.guide, alpha) - truth_comp).sum()) / megapixels
    scores = Scores(
        sad=float(np.abs(diff).sum()) / megapixels,
        mse=float((diff * diff).mean()),
        grad=float((grad_diff.astype(np.float64) ** 2).sum()) / megapixels,
        comp=comp,
        seconds_per_mp=seconds / megapixels,
    )
    if method == "ours":
        scores.comp_fg = foreground_error(case, alpha, truth_comp)
    return scores


def foreground_error(case: Case, alpha: np.ndarray, truth_comp: np.ndarray) -> float | None:
    """Composite error with estimate_foreground's colours (None until that module exists)."""
    try:
        from worker.foreground import estimate_foreground
    except ImportError:
        return None
    byte_alpha = np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)
    colours = estimate_foreground(case.guide, byte_alpha)
    rounded = byte_alpha.astype(np.float32) / 255
    error = np.abs(composite(colours, rounded) - truth_comp).sum()
    return float(error) / (case.truth.size / 1e6)


@dataclass
class Result:
    plan: Plan
    held_out: bool
    scores: dict[str, Scores] = field(default_factory=dict)


def run_case(plan: Plan, held_out: bool) -> tuple[Result, Case]:
    case = make_case(plan)
    truth_grad = gradient(case.truth)
    truth_comp = composite(case.front, case.truth)
    result = Result(plan, held_out)
    for method in METHODS:
        result.scores[method] = score(case, method, truth_grad, truth_comp)
    return result, case


# --- report ---------------------------------------------------------


def ratio_table(results: list[Result], metric: str, title: str) -> None:
    methods = [m for m in METHODS if m != "tutorial"]
    print(f"\n{title}: ratio to the tutorial | ratio to the reference")
    header = f"{'case':<50}" + "".join(f" {m:>15}" for m in methods)
    print(header)
    print("-" * len(header))
    for held_out in (False, True):
        group = [r for r in results if r.held_out is held_out]
        if not group:
            continue
        rows: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        for result in group:
            line = f"{result.plan.name:<50}"
            tut = getattr(result.scores["tutorial"], metric)
            ref = getattr(result.scores["reference"], metric)
            for m in methods:
                value = getattr(result.scores[m], metric)
                rows[m].append((value / tut, value / ref))
                line += f" {value / tut:>7.2f} | {value / ref:<5.2f}"
            print(line)
        label = "mean, held out" if held_out else "mean, tuning"
        line = f"{label:<50}"
        for m in methods:
            line += f" {statistics.mean(t for t, _ in rows[m]):>7.2f}"
            line += f" | {statistics.mean(r for _, r in rows[m]):<5.2f}"
        print(line)
        line = f"{'worst / tutorial' + (', held out' if held_out else ''):<50}"
        line += "".join(f" {max(t for t, _ in rows[m]):>7.2f}        " for m in methods)
        print(line)
        print("-" * len(header))


def composite_table(results: list[Result]) -> None:
    print("\ncomposite error over a new background, ratio to the tutorial's")
    header = f"{'case':<50} {'reference':>9} {'guided':>9} {'ours':>9} {'ours+fg':>9}"
    print(header)
    print("-" * len(header))
    for held_out in (False, True):
        group = [r for r in results if r.held_out is held_out]
        columns: dict[str, list[float]] = {}
        for result in group:
            tut = result.scores["tutorial"].comp
            values = {m: result.scores[m].comp / tut for m in ("reference", "guided", "ours")}
            fg = result.scores["ours"].comp_fg
            values["ours+fg"] = fg / tut if fg is not None else float("nan")
            for key, value in values.items():
                columns.setdefault(key, []).append(value)
            print(f"{result.plan.name:<50}" + "".join(f" {v:>9.2f}" for v in values.values()))
        label = "mean, held out" if held_out else "mean, tuning"
        print(f"{label:<50}" + "".join(f" {statistics.mean(v):>9.2f}" for v in columns.values()))
        print("-" * len(header))


def cost_table(results: list[Result]) -> None:
    print("\nCPU seconds per megapixel on one core (mean over cases of each size)")
    for size in SIZES:
        group = [r for r in results if r.plan.size == size]
        if not group:
            continue
        means = {m: statistics.mean(r.scores[m].seconds_per_mp for r in group) for m in METHODS}
        megapixels = SIZES[size][0] * SIZES[size][1] / 1e6
        line = f"{size:<6}" + "".join(f" {m} {v:.3f}" for m, v in means.items())
        print(line + f"   (ours per photo: {means['ours'] * megapixels:.2f} s)")


# --- picture ---------------------------------------------------------


def picture(case: Case, path: Path, side: int = 160) -> None:
    """Crops of one edge: alpha (top) and composite over green (bottom), for each method.

    The crop is the window holding the most true edge (not the one that flatters a method).
    """
    edges = cv2.boxFilter(gradient(case.truth), -1, (side, side), normalize=False)
    y, x = np.unravel_index(int(np.argmax(edges)), edges.shape)
    y = min(max(y, side // 2), case.truth.shape[0] - side // 2)
    x = min(max(x, side // 2), case.truth.shape[1] - side // 2)
    window = (slice(y - side // 2, y + side // 2), slice(x - side // 2, x + side // 2))
    alphas = {
        "tutorial": tutorial_alpha(case.soft, case.guide),
        "free reference": reference_alpha(case.soft, case.guide),
        "ours": our_alpha(case.soft, case.guide),
        "truth": case.truth,
    }
    tiles = []
    for label, alpha in alphas.items():
        colours = case.front if label == "truth" else case.guide
        comp = composite(colours, alpha)[window]
        grey = np.repeat((alpha[window] * 255)[:, :, None], 3, axis=2)
        column = np.concatenate([grey, comp], axis=0).clip(0, 255).astype(np.uint8)
        column = cv2.resize(column, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        caption = np.full((28, column.shape[1], 3), 255, np.uint8)
        cv2.putText(
            caption, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA
        )
        tiles.append(np.concatenate([caption, column], axis=0))
        tiles.append(np.full((tiles[-1].shape[0], 6, 3), 255, np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles[:-1], axis=1)).save(path, optimize=True)
    print(f"\npicture: {path} ({case.name}, {side} px around ({x}, {y}), 2x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 2 MP cases")
    parser.add_argument("--picture", type=Path, help="write before/after edge crops here (PNG)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    plans = [(p, False) for p in TUNING] + [(p, True) for p in HELD_OUT]
    if args.quick:
        plans = [(p, h) for p, h in plans if p.size != "12MP"]
    results = []
    for plan, held_out in plans:
        result, case = run_case(plan, held_out)
        results.append(result)
        ours = result.scores["ours"]
        print(
            f"{plan.name:<50} ours/tutorial SAD {ours.sad / result.scores['tutorial'].sad:.2f}",
            flush=True,
        )
        if args.picture and plan == TUNING[0]:
            picture(case, args.picture)
    ratio_table(results, "sad", "alpha SAD")
    ratio_table(results, "mse", "alpha MSE")
    ratio_table(results, "grad", "alpha gradient error")
    composite_table(results)
    cost_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
