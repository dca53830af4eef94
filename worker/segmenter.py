"""The segmenter: batched DeepLabV3 inference that turns photos into soft foreground maps.

Every image is letterboxed into the same square so a whole batch is one forward pass with a
fixed input geometry (cudnn picks its kernels once). The maps come back at model resolution;
the caller scales them to the photo and refines the edges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Self

import cv2
import numpy as np
import torch

from worker.weights import NUM_CLASSES, Fetch, load_model, resolve_weights, weights_identity

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean as a pixel value: letterbox padding normalises to (almost exactly) zero.
_PAD_PIXEL = tuple(round(m * 255) for m in IMAGENET_MEAN)


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
    ) -> None:
        self.name = name
        self.weights_id = weights_id
        self.device = pick_device(device)
        self.input_size = input_size
        self._cuda = self.device.type == "cuda"
        # fp16 halves memory traffic on GPU; CPU kernels are fastest (and exact) in fp32.
        self._dtype = torch.float16 if self._cuda else torch.float32
        model = model.eval().to(self.device, dtype=self._dtype)
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # the input shape never changes
            model = model.to(memory_format=torch.channels_last)
        self._model = model
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
            _check_image(image)
        selection = _class_selection(classes).to(self.device)
        canvas, sizes = self._letterbox(images)
        probabilities = self._probabilities(canvas)
        maps = torch.einsum("nchw,nc->nhw", probabilities, selection).clamp_(0, 1).cpu().numpy()
        # Copies, so a caller holding one map does not keep the whole batch alive.
        return [maps[i, :h, :w].copy() for i, (h, w) in enumerate(sizes)]

    def _letterbox(
        self, images: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """All images in one uint8 (N, S, S, 3) canvas, each at top left; their content sizes."""
        side = self.input_size
        # Filled in place through numpy; pinned on CUDA so the upload is an async DMA copy.
        canvas = torch.empty((len(images), side, side, 3), dtype=torch.uint8, pin_memory=self._cuda)
        pixels = canvas.numpy()
        pixels[:] = _PAD_PIXEL
        sizes = []
        for slot, image in zip(pixels, images, strict=True):
            resized = _fit(image, side)
            h, w = resized.shape[:2]
            slot[:h, :w] = resized
            sizes.append((h, w))
        return canvas, sizes

    def _probabilities(self, canvas: torch.Tensor) -> torch.Tensor:
        """Softmax over the 21 classes, float32 (N, 21, S, S)."""
        batch = canvas.to(self.device, non_blocking=True)
        # NHWC viewed as NCHW is already channels_last in memory, which the GPU model wants.
        batch = batch.permute(0, 3, 1, 2).float().sub_(self._mean).div_(self._std)
        if self._cuda:
            batch = batch.to(self._dtype).contiguous(memory_format=torch.channels_last)
        else:
            batch = batch.contiguous()
        logits = self._model(batch)["out"]
        return logits.float().softmax(dim=1)


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """The image scaled so its longest side is `side`, aspect kept (at least 1 pixel)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    # INTER_AREA averages when shrinking (no aliasing); it degrades to nearest when enlarging.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=interpolation)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")


def _class_selection(classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, 21) float: 1 where a channel counts as foreground for that image."""
    selection = torch.zeros(len(classes), NUM_CLASSES)
    for row, chosen in zip(selection, classes, strict=True):
        for index in chosen:
            if not 1 <= int(index) < NUM_CLASSES:
                raise ValueError(f"class index {index} is not a VOC class (1..{NUM_CLASSES - 1})")
            row[int(index)] = 1.0
    return selection
