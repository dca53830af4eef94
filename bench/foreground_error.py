"""Edge colours: how far a composite over a new background is from the true one.

Synthetic photos I = a·F + (1 − a)·B from real photo textures (scikit-image) and known mattes
(a soft silhouette, a wide soft edge, hair-like strands, a translucent blotch, a near-hard
edge). With the true alpha, a composite over any new background is off by a·(F̂ − F) per
pixel; the figure is its mean absolute value over the band (0 < a < 1), as a ratio to
compositing the photo's own RGB (what the tutorial, and Backdrop before, did). Also the CPU
seconds per megapixel on one core.

Methods: the photo's own RGB; blur fusion as published (Forte & Pitié 2021: boxes of 90 then
6 px over the whole frame); ours (worker/foreground.py); pymatting's multi-level estimator
(Germer et al. 2020) when pymatting is installed (not a Backdrop dependency).

Run: .venv/bin/python bench/foreground_error.py [--size 1632x1224] [--no-pymatting]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.foreground import estimate_foreground

SKIMAGE_DATA = Path(skimage.data.__file__).parent
Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


def texture(name: str, width: int, height: int) -> np.ndarray:
    path = next(SKIMAGE_DATA.glob(f"{name}.*"))
    image = np.asarray(Image.open(path).convert("RGB"))
    grow = width * height > image.shape[0] * image.shape[1]
    return cv2.resize(
        image, (width, height), interpolation=cv2.INTER_CUBIC if grow else cv2.INTER_AREA
    )


def silhouette(width: int, height: int, blur_share: float) -> np.ndarray:
    """The horse over most of the frame, its edge blurred by a share of the diagonal."""
    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    target_h = int(height * 0.8)
    target_w = min(width, horse.shape[1] * target_h // horse.shape[0])
    alpha = np.zeros((height, width), np.float32)
    top, left = (height - target_h) // 2, (width - target_w) // 2
    alpha[top : top + target_h, left : left + target_w] = (
        cv2.resize(horse, (target_w, target_h), interpolation=cv2.INTER_AREA) / 255
    )
    return cv2.GaussianBlur(alpha, (0, 0), blur_share * np.hypot(width, height))


def strands(width: int, height: int, seed: int) -> np.ndarray:
    """An ellipse with 400 hair-like strands, antialiased at 4x and shrunk."""
    rng = np.random.default_rng(seed)
    scale = 4
    big = np.zeros((height * scale, width * scale), np.uint8)
    centre = np.array([width * scale / 2, height * scale * 0.55])
    radii = np.array([width * scale * 0.22, height * scale * 0.3])
    cv2.ellipse(big, tuple(map(int, centre)), tuple(map(int, radii)), 0, 0, 360, 255, -1)
    step = width * scale * 0.006
    for _ in range(400):
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        points = [centre + 0.8 * radii * direction]
        for _ in range(30):
            direction = direction + rng.normal(0, 0.15, 2)
            direction /= np.linalg.norm(direction)
            points.append(points[-1] + step * direction)
        thickness = max(1, int(scale * width / 1200 * rng.uniform(0.5, 2)))
        cv2.polylines(big, [np.int32(points)], False, 255, thickness, cv2.LINE_AA)
    return cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def blotch(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth noise through a ramp: large translucent regions."""
    noise = np.random.default_rng(seed).normal(size=(height // 16 + 1, width // 16 + 1))
    noise = cv2.resize(noise.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), width / 200) * 3 + 0.5, 0, 1)


CASES: list[tuple[str, str, str, Callable[[int, int], np.ndarray]]] = [
    ("soft silhouette", "astronaut", "coffee", lambda w, h: silhouette(w, h, 0.0015)),
    ("wide soft edge", "chelsea", "motorcycle_left", lambda w, h: silhouette(w, h, 0.006)),
    ("near-hard edge", "coffee", "motorcycle_left", lambda w, h: silhouette(w, h, 0.0004)),
    ("hair strands", "coffee", "astronaut", lambda w, h: strands(w, h, 1)),
    ("hair strands 2", "motorcycle_left", "chelsea", lambda w, h: strands(w, h, 2)),
    ("translucent", "astronaut", "chelsea", lambda w, h: blotch(w, h, 3)),
    ("hair, rocket", "rocket", "coffee", lambda w, h: strands(w, h, 4)),
]


def make_case(
    front: str, back: str, matte: Callable[[int, int], np.ndarray], width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    subject = texture(front, width, height)
    alpha = np.clip(matte(width, height) * 255 + 0.5, 0, 255).astype(np.uint8)
    weight = alpha.astype(np.float32)[:, :, None] / 255
    photo = subject * weight + texture(back, width, height) * (1 - weight)
    return np.clip(photo + 0.5, 0, 255).astype(np.uint8), alpha, subject


def edge_error(colours: np.ndarray, truth: np.ndarray, alpha: np.ndarray) -> float:
    band = (alpha > 0) & (alpha < 255)
    weight = alpha[band].astype(np.float64)[:, None] / 255
    return float(np.abs(weight * (colours[band].astype(np.float64) - truth[band])).mean())


def blur_fusion_published(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Forte & Pitié's reference two-pass estimator, full frame, boxes of 90 then 6 px."""
    colour = image.astype(np.float32) / 255
    weight = alpha.astype(np.float32)[:, :, None] / 255

    def fuse(fg: np.ndarray, bg: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        mean_alpha = cv2.blur(weight, (size, size))[:, :, None]
        mean_f = cv2.blur(fg * weight, (size, size)) / (mean_alpha + 1e-5)
        mean_b = cv2.blur(bg * (1 - weight), (size, size)) / (1 - mean_alpha + 1e-5)
        residual = colour - weight * mean_f - (1 - weight) * mean_b
        return np.clip(mean_f + weight * residual, 0, 1), mean_b

    fg, mean_b = fuse(colour, colour, 90)
    fg, _ = fuse(fg, mean_b, 6)
    return _keep_hard(image, alpha, fg)


def pymatting_ml(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    from pymatting import estimate_foreground_ml

    fg = estimate_foreground_ml(image / 255.0, alpha / 255.0)
    return _keep_hard(image, alpha, fg)


def _keep_hard(image: np.ndarray, alpha: np.ndarray, fg: np.ndarray) -> np.ndarray:
    out = np.clip(fg * 255 + 0.5, 0, 255).astype(np.uint8)
    hard = (alpha == 0) | (alpha == 255)
    out[hard] = image[hard]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1632x1224", help="WIDTHxHEIGHT of every case")
    parser.add_argument("--no-pymatting", action="store_true", help="skip pymatting's estimator")
    args = parser.parse_args()
    width, height = (int(part) for part in args.size.split("x"))
    cv2.setNumThreads(1)
    methods: dict[str, Estimator] = {
        "photo's own RGB": lambda image, alpha: image,
        "blur fusion (published)": blur_fusion_published,
        "Backdrop (worker/foreground.py)": estimate_foreground,
    }
    if not args.no_pymatting:
        try:
            import pymatting  # noqa: F401

            pymatting_ml(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 128, np.uint8))  # JIT
            methods["pymatting estimate_foreground_ml"] = pymatting_ml
        except ImportError:
            print("(pymatting not installed: its row is skipped)")
    megapixels = width * height / 1e6
    print(f"{len(CASES)} cases at {width}x{height}, true alpha; ratio = error / photo's own RGB")
    header = "".join(f"{name[:12]:>14}" for name, *_ in CASES)
    print(f"{'method':<34}{header}{'mean':>8}{'max':>7}{'s/MP':>8}")
    cases = [make_case(front, back, matte, width, height) for _, front, back, matte in CASES]
    for name, method in methods.items():
        ratios, seconds = [], []
        for photo, alpha, truth in cases:
            started = time.process_time()
            estimate = method(photo, alpha)
            seconds.append(time.process_time() - started)
            ratios.append(edge_error(estimate, truth, alpha) / edge_error(photo, truth, alpha))
        cells = "".join(f"{ratio:>14.3f}" for ratio in ratios)
        per_mp = statistics.median(seconds) / megapixels
        print(f"{name:<34}{cells}{np.mean(ratios):>8.3f}{max(ratios):>7.3f}{per_mp:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
