"""Compositing speed on a 12 MP photo: the LearnOpenCV tutorial's float64 blend vs ours.

Also the cost of decontamination (foreground colour estimation in the edge band) at 2 MP
and 12 MP. Every figure is the median CPU time (time.process_time) of N runs, OpenCV on one
thread: what one job costs one core, however busy the machine is.

Run: .venv/bin/python bench/composite_speed.py [--repeat N]
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

from worker import composite
from worker.foreground import estimate_foreground

SKIMAGE_DATA = Path(skimage.data.__file__).parent
WIDTH, HEIGHT = 4000, 3000


def photo(name: str, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    image = np.asarray(Image.open(SKIMAGE_DATA / f"{name}.png").convert("RGB"))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def soft_alpha(width: int = WIDTH, height: int = HEIGHT, sigma: float = 3) -> np.ndarray:
    """A horse silhouette over most of the frame with a soft, few-pixel edge."""
    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    target_h = int(height * 0.8)
    target_w = horse.shape[1] * target_h // horse.shape[0]
    alpha = np.zeros((height, width), np.uint8)
    top, left = (height - target_h) // 2, (width - target_w) // 2
    alpha[top : top + target_h, left : left + target_w] = cv2.resize(horse, (target_w, target_h))
    return cv2.GaussianBlur(alpha, (0, 0), sigma)


def tutorial_remove(foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """LearnOpenCV's blend onto white, float64 throughout, back to uint8 for comparison."""
    background = np.full_like(foreground, 255)
    alpha3 = np.dstack([alpha] * 3).astype(float) / 255
    fg = cv2.multiply(alpha3, foreground.astype(float))
    bg = cv2.multiply(1.0 - alpha3, background.astype(float))
    out = cv2.add(fg, bg) / 255
    return (out * 255).astype(np.uint8)


def reference_remove(foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The exact blend, float64 and rounded to nearest: what both are measured against."""
    a = alpha[:, :, None].astype(np.float64) / 255
    return np.floor(foreground * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def median_ms(function: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeat):
        started = time.process_time()
        result = function()
        times.append((time.process_time() - started) * 1e3)
    assert result is not None
    return statistics.median(times), result


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def print_decontamination(repeat: int) -> None:
    """estimate_foreground's cost: it follows the edge band, so two edge softnesses per size."""
    print(f"{'decontaminate (estimate F)':<32} {'band %':>7} {'median ms':>10}")
    for width, height in ((1632, 1224), (WIDTH, HEIGHT)):
        image, megapixels = photo("astronaut", width, height), round(width * height / 1e6)
        for sigma in (3.0, 7.5):  # at 12 MP; the same share of the frame at 2 MP
            alpha = soft_alpha(width, height, sigma * width / WIDTH)
            decontamination_row(
                f"{megapixels} MP, edge sigma {sigma} px @12MP", image, alpha, repeat
            )
        hard = np.where(soft_alpha(width, height) > 127, 255, 0).astype(np.uint8)
        decontamination_row(f"{megapixels} MP, hard mask (skipped)", image, hard, repeat)


def decontamination_row(name: str, image: np.ndarray, alpha: np.ndarray, repeat: int) -> None:
    band = 100 * np.count_nonzero((alpha > 0) & (alpha < 255)) / alpha.size
    elapsed, _ = median_ms(lambda: estimate_foreground(image, alpha), repeat)
    print(f"{name:<32} {band:>7.1f} {elapsed:>10.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core per job, as a worker thread gets
    image, other, alpha = photo("astronaut"), photo("coffee"), soft_alpha()
    reference = reference_remove(image, alpha)

    tutorial_ms, tutorial = median_ms(lambda: tutorial_remove(image, alpha), args.repeat)
    ours_ms, ours = median_ms(
        lambda: composite.remove_background(image, alpha, (255, 255, 255)), args.repeat
    )
    foreground = estimate_foreground(image, alpha)
    print(f"12 MP ({WIDTH}x{HEIGHT}), median CPU time of {args.repeat} runs, cv2 on 1 thread")
    print(f"{'remove onto white':<32} {'median ms':>10} {'max |diff| vs float64 ref':>27}")
    print(f"{'tutorial (float64)':<32} {tutorial_ms:>10.1f} {max_diff(tutorial, reference):>27}")
    print(f"{'ours (cv2.blendLinear)':<32} {ours_ms:>10.1f} {max_diff(ours, reference):>27}")
    print(f"speed-up: {tutorial_ms / ours_ms:.1f}x")
    print()
    others = {
        "remove (transparent RGBA)": lambda: composite.remove_background(foreground, alpha, None),
        "replace (cover + blend)": lambda: composite.replace_background(
            foreground, alpha, other[:2000]
        ),
        "blur (strength 0.5)": lambda: composite.blur_background(image, alpha, 0.5, foreground),
        "blur (strength 1.0)": lambda: composite.blur_background(image, alpha, 1.0, foreground),
        "desaturate": lambda: composite.desaturate_background(image, alpha, foreground),
    }
    print(f"{'other effects (ours, with F)':<32} {'median ms':>10}")
    for name, function in others.items():
        elapsed, _ = median_ms(function, args.repeat)
        print(f"{name:<32} {elapsed:>10.1f}")
    print()
    print_decontamination(args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
