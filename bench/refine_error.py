"""How much closer to the true matte refine_mask gets than the LearnOpenCV tutorial's mask.

Each case composites one real photo over another through a known soft matte (a real
silhouette with a few-pixel soft edge), degrades that matte the way DeepLabV3 sees it (1/8 of
the model's input resolution, bilinearly upsampled), and scores both the tutorial's recipe and
refine_mask against the truth. Run: .venv/bin/python bench/refine_error.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.refine import refine_mask

SKIMAGE_DATA = Path(skimage.data.__file__).parent
MODEL_SHORT_SIDE = 520  # torchvision's DeepLabV3 evaluation resize
OUTPUT_STRIDE = 8
EDGE_SIGMA = 1.5  # the true matte's soft edge, in full-resolution pixels
SIZES = {"0.3MP": (640, 480), "12MP": (4000, 3000)}


@dataclass(frozen=True)
class Case:
    name: str
    guide: np.ndarray  # (H, W, 3) uint8 composite
    truth: np.ndarray  # (H, W) float32 alpha in 0..1
    soft: np.ndarray  # (h, w) float32 what the model would hand refine_mask


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(SKIMAGE_DATA / f"{name}.png").convert("RGB"))


def horse_silhouette() -> np.ndarray:
    return (~skimage.data.horse()).astype(np.float32)


def cameraman_silhouette() -> np.ndarray:
    """The dark coat and camera of the cameraman: a thresholded, smoothed photo region."""
    grey = cv2.GaussianBlur(skimage.data.camera(), (0, 0), 3)
    dark = (grey < 40).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(dark)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.float32)


def place(shape: np.ndarray, width: int, height: int) -> np.ndarray:
    """The silhouette scaled to 80% of the frame's height, centred, with a soft edge."""
    target_h = int(height * 0.8)
    target_w = int(shape.shape[1] * target_h / shape.shape[0])
    scaled = cv2.resize(shape, (target_w, target_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((height, width), np.float32)
    top, left = (height - target_h) // 2, (width - target_w) // 2
    canvas[top : top + target_h, left : left + target_w] = scaled > 0.5
    return cv2.GaussianBlur(canvas, (0, 0), EDGE_SIGMA)


def fitted(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A photo scaled to cover the frame (cubic when enlarging, as for the 12 MP case)."""
    scale = max(width / image.shape[1], height / image.shape[0])
    size = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    big = cv2.resize(image, size, interpolation=interpolation)
    top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    return big[top : top + height, left : left + width]


def model_view(truth: np.ndarray) -> np.ndarray:
    """The matte as DeepLabV3 predicts it: at 1/8 of its input size, upsampled to the input."""
    height, width = truth.shape
    scale = MODEL_SHORT_SIDE / min(height, width)
    model_w, model_h = round(width * scale), round(height * scale)
    coarse = cv2.resize(
        truth, (model_w // OUTPUT_STRIDE, model_h // OUTPUT_STRIDE), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(coarse, (model_w, model_h), interpolation=cv2.INTER_LINEAR)


def make_case(fg: str, bg: str, shape_name: str, size: str) -> Case:
    width, height = SIZES[size]
    shape = {"horse": horse_silhouette, "cameraman": cameraman_silhouette}[shape_name]()
    truth = place(shape, width, height)
    front = fitted(photo(fg), width, height).astype(np.float32)
    back = fitted(photo(bg), width, height).astype(np.float32)
    a = truth[:, :, None]
    guide = np.clip(front * a + back * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    return Case(f"{fg}/{bg} {shape_name} {size}", guide, truth, model_view(truth))


def tutorial_alpha(soft: np.ndarray, width: int, height: int) -> np.ndarray:
    """LearnOpenCV's decode_segmap: hard threshold, 7x7 Gaussian at model res, resized up."""
    binary = (soft > 0.5).astype(np.float32)
    blurred = cv2.GaussianBlur(binary, (7, 7), 0)
    return cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR)


def errors(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(SAD per megapixel, MSE) with alpha in 0..1."""
    diff = estimate.astype(np.float64) - truth
    megapixels = truth.size / 1e6
    return float(np.abs(diff).sum()) / megapixels, float((diff * diff).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.3 MP cases and one 12 MP case")
    args = parser.parse_args()
    pairs = [
        ("astronaut", "coffee", "horse"),
        ("chelsea", "motorcycle_left", "cameraman"),
        ("coffee", "astronaut", "cameraman"),
        ("motorcycle_left", "chelsea", "horse"),
    ]
    plan = [(*pair, "0.3MP") for pair in pairs]
    plan += [(*pair, "12MP") for pair in (pairs[:1] if args.quick else pairs[:2])]

    header = f"{'case':<40} {'tut SAD/MP':>11} {'our SAD/MP':>11} {'ratio':>6}"
    header += f" {'tut MSE':>9} {'our MSE':>9} {'ratio':>6} {'refine ms':>9}"
    print(header)
    print("-" * len(header))
    totals: dict[str, list[float]] = {}
    for fg, bg, shape_name, size in plan:
        case = make_case(fg, bg, shape_name, size)
        height, width = case.truth.shape
        started = time.perf_counter()
        ours = refine_mask(case.soft, case.guide).astype(np.float32) / 255
        elapsed_ms = (time.perf_counter() - started) * 1e3
        tut_sad, tut_mse = errors(tutorial_alpha(case.soft, width, height), case.truth)
        our_sad, our_mse = errors(ours, case.truth)
        row = totals.setdefault(size, [0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate((tut_sad, our_sad, tut_mse, our_mse)):
            row[i] += value
        print(
            f"{case.name:<40} {tut_sad:>11.0f} {our_sad:>11.0f} {our_sad / tut_sad:>6.2f}"
            f" {tut_mse:>9.5f} {our_mse:>9.5f} {our_mse / tut_mse:>6.2f} {elapsed_ms:>9.0f}"
        )
    print("-" * len(header))
    for size, (tut_sad, our_sad, tut_mse, our_mse) in totals.items():
        print(
            f"{'total ' + size:<40} {tut_sad:>11.0f} {our_sad:>11.0f} {our_sad / tut_sad:>6.2f}"
            f" {tut_mse:>9.5f} {our_mse:>9.5f} {our_mse / tut_mse:>6.2f}"
        )
    print("SAD/MP: sum |alpha - truth| per megapixel (alpha 0..1); ratio = ours / tutorial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
