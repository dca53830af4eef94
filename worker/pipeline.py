"""One job's imaging, from decoded photo and soft mask to encoded output.

`backdrop process` and the Celery task both run this, so the local command shows exactly
what the workers produce.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from producer.errors import NoSubject
from producer.request import Effect, JobRequest
from worker import composite
from worker.foreground import estimate_foreground
from worker.imageio import DecodedImage, encode_image, encode_mask
from worker.matting import TorchBackend
from worker.refine import refine_mask

if TYPE_CHECKING:
    import torch

# Below this share of confident foreground pixels the photo is judged to have no subject.
NO_SUBJECT_FRACTION = 0.001

Segment = Callable[[np.ndarray, Sequence[int]], np.ndarray]


@dataclass
class Timings:
    ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round(self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1e3, 2)


@dataclass(frozen=True)
class Rendered:
    image: bytes
    mask: bytes | None
    foreground_fraction: float


def alpha_for(
    photo: DecodedImage,
    request: JobRequest,
    timings: Timings,
    *,
    segment: Segment,
    coarse_mask: np.ndarray | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Full-resolution alpha: the model's soft mask (or a supplied coarse one), refined."""
    soft = soft_mask(photo, request, timings, segment=segment, coarse_mask=coarse_mask)
    return refined(photo, soft, timings, device=device)


def soft_mask(
    photo: DecodedImage,
    request: JobRequest,
    timings: Timings,
    *,
    segment: Segment,
    coarse_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The model's [0, 1] soft mask at its own resolution, or a supplied coarse one."""
    if coarse_mask is not None:
        return coarse_mask.astype(np.float32) / 255.0
    with timings.stage("segment"):
        return segment(photo.rgb, request.class_indices)


def refined(
    photo: DecodedImage, soft: np.ndarray, timings: Timings, *, device: torch.device | None = None
) -> np.ndarray:
    """The soft mask refined to a full-resolution alpha.

    A GPU `device` (the segmenter's) also runs the matting solve, so a host feeding a fast GPU
    does not become the bottleneck; on a CPU the numpy path is the faster one."""
    backend = TorchBackend(str(device)) if _accelerated(device) else None
    with timings.stage("refine"):
        return refine_mask(soft, photo.rgb, backend=backend)


def _accelerated(device: torch.device | None) -> bool:
    return device is not None and device.type != "cpu"


def foreground_fraction(alpha: np.ndarray) -> float:
    return float(np.count_nonzero(alpha > 127)) / alpha.size


def apply_effect(
    rgb: np.ndarray,
    foreground: np.ndarray,
    alpha: np.ndarray,
    request: JobRequest,
    background: np.ndarray | None,
) -> np.ndarray:
    """The effect's pixels: the subject drawn with its foreground colours over the new backdrop."""
    effect = Effect(request.effect)
    if effect is Effect.REMOVE:
        colour = None if request.transparent else composite.parse_colour(request.background or "")
        return composite.remove_background(foreground, alpha, colour)
    if effect is Effect.REPLACE:
        assert background is not None, "replace needs its background decoded first"
        return composite.replace_background(foreground, alpha, background)
    if effect is Effect.BLUR:
        return composite.blur_background(rgb, alpha, request.blur_strength, foreground)
    return composite.desaturate_background(rgb, alpha, foreground)


def render(
    photo: DecodedImage,
    alpha: np.ndarray,
    request: JobRequest,
    timings: Timings,
    *,
    background: np.ndarray | None = None,
    want_mask: bool = False,
    device: torch.device | None = None,
) -> Rendered:
    """Composite and encode. A GPU `device` (the segmenter's) also takes the colour estimate,
    which on a CPU runs faster in OpenCV on the edge band alone."""
    fraction = foreground_fraction(alpha)
    if request.fail_on_no_subject and fraction < NO_SUBJECT_FRACTION:
        raise NoSubject(
            f"no subject of the classes {request.classes or 'any'} found "
            f"({fraction:.2%} of the image is foreground)"
        )
    # Every effect shows the subject over something new, so its edge needs the subject's own
    # colours (free where the alpha is hard: the photo itself comes back).
    with timings.stage("decontaminate"):
        on_device = device if _accelerated(device) else None
        foreground = estimate_foreground(photo.rgb, alpha, device=on_device)
    with timings.stage("composite"):
        pixels = apply_effect(photo.rgb, foreground, alpha, request, background)
    with timings.stage("encode"):
        image = encode_image(
            pixels, request.format, quality=request.jpeg_quality, icc_profile=photo.icc_profile
        )
        mask = encode_mask(alpha) if want_mask else None
    return Rendered(image=image, mask=mask, foreground_fraction=round(fraction, 5))
