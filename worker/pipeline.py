"""One job's imaging: fetch, decode, mask, refine, composite, frame and encode, then store.

The Celery task and `backdrop process` both run this one path, each with its own reader and
writer, so the local command shows exactly what the workers produce. The task adds only what
a shared worker needs around it (ownership, leases, a memory budget, CPU slots, recording).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from producer.errors import BackgroundNotFound, InputNotFound, NoSubject, PermanentError
from producer.formats import MASK_FORMAT, OutputFormat
from producer.request import Effect, JobRequest
from worker import composite, crop
from worker.foreground import estimate_foreground
from worker.imageio import DecodedImage, decode_image, decode_mask, encode_image, encode_mask
from worker.matting import TorchBackend
from worker.refine import refine_mask

if TYPE_CHECKING:
    import torch

# Below this share of confident foreground pixels the photo is judged to have no subject.
NO_SUBJECT_FRACTION = 0.001

Segment = Callable[[np.ndarray, Sequence[int]], np.ndarray]
# The bytes at a location; InputNotFound when there is nothing there.
Reader = Callable[[str], bytes]
# Stores bytes at a location with their content type.
Writer = Callable[[str, bytes, str], None]
# The model's device once it is loaded (None: not loaded, or no model): refinement and the
# colour estimate run there too when it is a GPU.
Device = Callable[[], "torch.device | None"]


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
class Inputs:
    """A job's images as fetched, still compressed."""

    photo: bytes
    mask: bytes | None
    background: bytes | None


@dataclass(frozen=True)
class Rendered:
    image: bytes
    mask: bytes | None
    foreground_fraction: float
    input_size: tuple[int, int]  # the photo's (width, height), as the job record has it


@contextmanager
def named(what: str) -> Iterator[None]:
    """A bad mask or background names itself: the user must know which file was wrong."""
    try:
        yield
    except PermanentError as exc:
        raise type(exc)(f"{what}: {exc.message}") from None


def fetch(request: JobRequest, read: Reader) -> Inputs:
    """The photo, and the mask and background the request names."""
    background = None
    if request.effect == Effect.REPLACE:
        try:
            background = read(request.background or "")
        except InputNotFound as exc:
            raise BackgroundNotFound(f"background: {exc.message}") from None
    mask = None
    if request.mask is not None:
        with named("mask"):
            mask = read(request.mask)
    return Inputs(photo=read(request.input), mask=mask, background=background)


class Imaging:
    """Runs jobs' imaging with one model, the pixel limits and (in a worker) CPU slots.

    `cpu` gives a context held while a job decodes, refines, composites and encodes, but not
    while it waits for the model: a job waiting for its batch must not keep a core's slot
    from one that has its mask (see worker/threadplan.py)."""

    def __init__(
        self,
        segment: Segment,
        *,
        device: Device,
        max_pixels: int,
        max_bytes: int,
        cpu: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        self._segment = segment
        self._device = device
        self._limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
        self._cpu = cpu

    def process(
        self,
        request: JobRequest,
        read: Reader,
        timings: Timings,
        *,
        want_mask: bool,
        admit: Callable[[Inputs], AbstractContextManager[object]] = nullcontext,
    ) -> Rendered:
        """Fetch and render one job. `admit` is entered once the inputs are fetched (a
        worker's memory reservation, sized from their headers) and held until the decoded
        arrays are gone."""
        with timings.stage("download"):
            inputs = fetch(request, read)
        with admit(inputs):
            return self.render_inputs(inputs, request, timings, want_mask=want_mask)

    def render_inputs(
        self, inputs: Inputs, request: JobRequest, timings: Timings, *, want_mask: bool
    ) -> Rendered:
        """Decode, mask, refine, composite, frame and encode fetched inputs."""
        with self._cpu(), timings.stage("decode"):
            photo = decode_image(inputs.photo, **self._limits)
            coarse = background = None
            if inputs.mask is not None:
                with named("mask image"):
                    coarse = decode_mask(inputs.mask, **self._limits)
            if inputs.background is not None:
                with named("background image"):
                    background = decode_image(inputs.background, **self._limits).rgb
        soft = soft_mask(photo, request, timings, segment=self._segment, coarse_mask=coarse)
        device = self._device()
        with self._cpu():
            alpha = refined(photo, soft, timings, device=device)
            return render(
                photo,
                alpha,
                request,
                timings,
                background=background,
                want_mask=want_mask,
                device=device,
            )


def store(
    rendered: Rendered, write: Writer, *, output: str, mask_output: str | None, fmt: str
) -> None:
    """Write the image (and the mask, where one was rendered and a place given for it)."""
    write(output, rendered.image, OutputFormat(fmt).content_type)
    if rendered.mask is not None and mask_output is not None:
        write(mask_output, rendered.mask, MASK_FORMAT.content_type)


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
    """Composite, frame and encode. A GPU `device` (the segmenter's) also takes the colour
    estimate, which on a CPU runs faster in OpenCV on the edge band alone."""
    # Judged on the whole photo's alpha: a crop must not make a speck look like a subject.
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
    with timings.stage("frame"):
        framed = crop.frame_for(request, pixels, alpha)
    with timings.stage("encode"):
        image = encode_image(
            framed.pixels,
            request.format,
            quality=request.jpeg_quality,
            icc_profile=photo.icc_profile,
        )
        mask = encode_mask(framed.alpha) if want_mask else None
    height, width = photo.rgb.shape[:2]
    return Rendered(
        image=image,
        mask=mask,
        foreground_fraction=round(fraction, 5),
        input_size=(width, height),
    )
