"""Compositing speed on a 12 MP photo: the LearnOpenCV tutorial's float64 blend vs ours.

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

SKIMAGE_DATA = Path(skimage.data.__file__).parent
WIDTH, HEIGHT = 4000, 3000


def photo(name: str) -> np.ndarray:
    image = np.asarray(Image.open(SKIMAGE_DATA / f"{name}.png").convert("RGB"))
    return cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)


def soft_alpha() -> np.ndarray:
    """A horse silhouette over most of the frame with a soft, few-pixel edge."""
    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    target_h = int(HEIGHT * 0.8)
    target_w = horse.shape[1] * target_h // horse.shape[0]
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    top, left = (HEIGHT - target_h) // 2, (WIDTH - target_w) // 2
    alpha[top : top + target_h, left : left + target_w] = cv2.resize(horse, (target_w, target_h))
    return cv2.GaussianBlur(alpha, (0, 0), 3)


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
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1e3)
    assert result is not None
    return statistics.median(times), result


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


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
    print(f"12 MP ({WIDTH}x{HEIGHT}), median of {args.repeat} runs, cv2 on 1 thread")
    print(f"{'remove onto white':<28} {'median ms':>10} {'max |diff| vs float64 ref':>27}")
    print(f"{'tutorial (float64)':<28} {tutorial_ms:>10.1f} {max_diff(tutorial, reference):>27}")
    print(f"{'ours (cv2.blendLinear)':<28} {ours_ms:>10.1f} {max_diff(ours, reference):>27}")
    print(f"speed-up: {tutorial_ms / ours_ms:.1f}x")
    print()
    others = {
        "remove (transparent RGBA)": lambda: composite.remove_background(image, alpha, None),
        "replace (cover + blend)": lambda: composite.replace_background(image, alpha, other[:2000]),
        "blur (strength 0.5)": lambda: composite.blur_background(image, alpha, 0.5),
        "blur (strength 1.0)": lambda: composite.blur_background(image, alpha, 1.0),
        "desaturate": lambda: composite.desaturate_background(image, alpha),
    }
    print(f"{'other effects (ours)':<28} {'median ms':>10}")
    for name, function in others.items():
        elapsed, _ = median_ms(function, args.repeat)
        print(f"{name:<28} {elapsed:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
