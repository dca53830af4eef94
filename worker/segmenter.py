"""The segmenter: batched DeepLabV3 inference that turns photos into soft foreground maps.

Each image is scaled so its longest side is the input size and placed at the top left of a
canvas whose short side is rounded up to a multiple of SHAPE_STEP. Images that share a canvas
shape (every photo of one aspect ratio, whatever its resolution) run in one forward pass, and
an image's map never depends on its batch-mates. The short step keeps padding under a few
percent (a square canvas wastes a quarter of the compute on a 4:3 photo) while the number of
distinct shapes stays small enough for cudnn to tune each once. The maps come back at model
resolution; the caller scales them to the photo and refines the edges.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Self

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from producer.catalog import CLASS_AGNOSTIC
from producer.settings import Settings
from worker.imageio import check_image
from worker.salient import SalientSegmenter
from worker.weights import NUM_CLASSES, Fetch, load_model, resolve_weights, weights_identity

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean as a pixel value: letterbox padding normalises to (almost exactly) zero.
_PAD_PIXEL = tuple(round(m * 255) for m in IMAGENET_MEAN)
SHAPE_STEP = 32


def pick_device(device: str) -> torch.device:
    """ "auto" means CUDA when there is a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available")
    return chosen


class Segmenter:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        weights_id: str,
        device: str = "auto",
        input_size: int = 520,
        half: bool | None = None,
    ) -> None:
        """`half`: fp16 weights and activations; by default on CUDA only."""
        self.name = name
        self.weights_id = weights_id
        self.device = pick_device(device)
        self.input_size = input_size
        self._cuda = self.device.type == "cuda"
        # fp16 halves memory traffic on GPU; CPU kernels are fastest (and exact) in fp32.
        self._dtype = torch.float16 if (self._cuda if half is None else half) else torch.float32
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # few canvas shapes, each tuned once
        # channels_last on CPU too: oneDNN's NHWC convolutions (depthwise ones above all) run
        # about twice as fast as NCHW ones on the MobileNet.
        self._model = (
            fold_batchnorm(model.eval())
            .to(self.device, dtype=self._dtype)
            .to(memory_format=torch.channels_last)
        )
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape) * 255
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(shape) * 255

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        weights: str | None = None,
        device: str = "auto",
        input_size: int = 520,
        fetch: Fetch | None = None,
    ) -> Self:
        """Find the weights (see resolve_weights), build the model, and wrap it."""
        started = time.perf_counter()
        path = resolve_weights(model_name, weights, fetch=fetch)
        model = load_model(model_name, path)
        segmenter = cls(
            model,
            name=model_name,
            weights_id=weights_identity(path),
            device=device,
            input_size=input_size,
        )
        log.info(
            "loaded %s (%s) on %s in %.1fs",
            model_name,
            segmenter.weights_id,
            segmenter.device,
            time.perf_counter() - started,
        )
        return segmenter

    @torch.inference_mode()
    def predict(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Per image, a float32 map in [0, 1]: the probability of any of its classes.

        Each map covers the image content at model resolution (longest side = input_size).
        """
        if len(images) != len(classes):
            raise ValueError(f"{len(images)} images but {len(classes)} class lists")
        if not images:
            return []
        for image in images:
            check_image(image)
        selection = _class_selection(classes).to(self.device)
        fitted = [_fit(image, self.input_size) for image in images]
        maps: list[np.ndarray | None] = [None] * len(images)
        for shape, members in _group_by_canvas(fitted, self.input_size).items():
            canvas = self._canvas([fitted[i] for i in members], shape)
            group = chosen_probability(self._logits(canvas), selection[members], shape)
            for row, i in enumerate(members):
                h, w = fitted[i].shape[:2]
                # A copy, so a caller holding one map does not keep the whole group alive.
                maps[i] = group[row, :h, :w].copy()
        return maps  # type: ignore[return-value]

    def _canvas(self, fitted: Sequence[np.ndarray], shape: tuple[int, int]) -> torch.Tensor:
        """The fitted images in one uint8 (N, H, W, 3) canvas, each at top left."""
        # Filled in place through numpy; pinned on CUDA so the upload is an async DMA copy
        # (torch's caching host allocator hands the same pinned blocks back call after call).
        canvas = torch.empty((len(fitted), *shape, 3), dtype=torch.uint8, pin_memory=self._cuda)
        pixels = canvas.numpy()
        pixels[:] = _PAD_PIXEL
        for slot, image in zip(pixels, fitted, strict=True):
            h, w = image.shape[:2]
            slot[:h, :w] = image
        return canvas

    def _logits(self, canvas: torch.Tensor) -> torch.Tensor:
        """float32 (N, 21, h, w) logits at the model's stride: DeepLabV3's forward without its
        upsampling, which chosen_probability does more cheaply."""
        batch = canvas.to(self.device, non_blocking=True)
        # NHWC viewed as NCHW is already channels_last in memory, which the model wants.
        batch = batch.permute(0, 3, 1, 2).float().sub_(self._mean).div_(self._std)
        batch = batch.to(self._dtype).contiguous(memory_format=torch.channels_last)
        # torchvision's DeepLabV3 holds these as untyped submodules.
        backbone: nn.Module = self._model.backbone  # type: ignore[assignment]
        classifier: nn.Module = self._model.classifier  # type: ignore[assignment]
        logits: torch.Tensor = classifier(backbone(batch)["out"])
        return logits.float()


def chosen_probability(
    logits: torch.Tensor, selection: torch.Tensor, size: tuple[int, int]
) -> np.ndarray:
    """(N, H, W) float32: the softmax probability of each image's selected classes, with the
    logits upsampled bilinearly to `size` first, as DeepLabV3's forward does.

    Only two sums per pixel are needed (the selected classes' exponentials and all of them),
    so no 21-channel softmax or probability map is ever built: a third of the CPU of
    upsampling, softmax and selection done one after the other. Each cell's logits are
    shifted by their maximum first, which softmax ignores: a bilinear mix of shifted logits
    is at most 0, so exp never overflows.
    """
    weights = torch.stack([selection, torch.ones_like(selection)], dim=2).to(logits.device)
    shifted = logits - logits.amax(dim=1, keepdim=True)
    sums = _exp_sums(_upsampled(shifted, size), weights)
    if bool((sums[..., 1] < UNDERFLOW).any()):
        # Neighbouring cells sure of different classes by ~70 or more: between them every
        # exponential of a pixel can underflow. Each pixel shifted by its own maximum keeps
        # one exponential at 1 (a third more CPU, for such logits only).
        upsampled = _upsampled(logits, size)
        sums = _exp_sums(upsampled.sub_(upsampled.amax(dim=1, keepdim=True)), weights)
    chosen = sums[..., 0] / sums[..., 1]
    return chosen.clamp_(0, 1).reshape(len(logits), *size).cpu().numpy()


# Below this a pixel's sum of exponentials has lost precision to float32's underflow.
UNDERFLOW = 1e-30


def _upsampled(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # channels_last: the upsampling runs several times faster, and each pixel's 21 values
    # lie together for the product in _exp_sums.
    return F.interpolate(
        logits.contiguous(memory_format=torch.channels_last),
        size=size,
        mode="bilinear",
        align_corners=False,
    )


def _exp_sums(upsampled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, H * W, 2): per pixel, the sum of exp over the selected classes and over all."""
    pixels = upsampled.exp_().permute(0, 2, 3, 1).reshape(len(upsampled), -1, NUM_CLASSES)
    return pixels @ weights


def load_segmenter(settings: Settings, fetch: Fetch | None = None) -> Segmenter | SalientSegmenter:
    """The configured model on the configured device; `fetch` downloads BACKDROP_WEIGHTS
    when it names a location in storage."""
    if settings.model in CLASS_AGNOSTIC:
        return SalientSegmenter.load(
            settings.model,
            weights=settings.weights,
            device=settings.device,
            threads=settings.torch_threads,
            fetch=fetch,
        )
    return Segmenter.load(
        settings.model,
        weights=settings.weights,
        device=settings.device,
        input_size=settings.model_input_size,
        fetch=fetch,
    )


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each inference-mode BatchNorm into the convolution that feeds it, in place.

    Same outputs (to float rounding), one pass fewer over every activation map. A pair is
    folded only where the BatchNorm is known to be applied straight to that convolution's
    output: neighbours in a Sequential, or torchvision ResNet's convN/bnN attributes.
    """
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and _applied_in_order(module, conv_name, bn_name)
        ):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
    for _, child in module.named_children():
        fold_batchnorm(child)
    return module


def _applied_in_order(module: nn.Module, conv_name: str, bn_name: str) -> bool:
    if isinstance(module, nn.Sequential):
        return True
    return conv_name.startswith("conv") and bn_name == "bn" + conv_name.removeprefix("conv")


def _group_by_canvas(fitted: Sequence[np.ndarray], side: int) -> dict[tuple[int, int], list[int]]:
    """Image indices by canvas shape: the fitted size, short side rounded up to SHAPE_STEP."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(fitted):
        h, w = image.shape[:2]
        shape = (min(side, _round_up(h, SHAPE_STEP)), min(side, _round_up(w, SHAPE_STEP)))
        groups.setdefault(shape, []).append(i)
    return groups


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """The image scaled so its longest side is `side`, aspect kept (at least 1 pixel)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    if scale < 1:  # area averaging: no aliasing
        return _shrink(np.ascontiguousarray(image), *size)
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_LINEAR)


def _shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """image area-averaged to width x height, by whole halvings first while it is at least
    twice that both ways: OpenCV averages 2x2 blocks about ten times faster than it resamples
    by an arbitrary factor (1.2 against 13 ms for a 1600x1200 photo on one core), and the last
    step then reads a quarter of the pixels. The box is up to a pixel wider than a direct
    resize's: a slightly softer input for a model that predicts at an eighth or a sixteenth
    of it. (Refinement's guide keeps the direct resize: there the wider box cost a few
    percent of edge accuracy in bench/refine_error.py.)"""
    # Odd sides are never halved: a 2x2 grid would drop the last row or column and shift the
    # image against the photo.
    while (
        image.shape[1] >= 2 * width
        and image.shape[0] >= 2 * height
        and image.shape[1] % 2 == 0
        and image.shape[0] % 2 == 0
    ):
        half = (image.shape[1] // 2, image.shape[0] // 2)
        image = cv2.resize(image, half, interpolation=cv2.INTER_AREA)
    if image.shape[:2] == (height, width):
        return image
    shrunk: np.ndarray = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return shrunk


def _class_selection(classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, 21) float: 1 where a channel counts as foreground for that image."""
    selection = torch.zeros(len(classes), NUM_CLASSES)
    for row, chosen in zip(selection, classes, strict=True):
        for index in chosen:
            if not 1 <= int(index) < NUM_CLASSES:
                raise ValueError(f"class index {index} is not a VOC class (1..{NUM_CLASSES - 1})")
            row[int(index)] = 1.0
    return selection
