"""Class-agnostic subject models (U²-Net, ISNet) run with onnxruntime: one salient map a photo.

DeepLabV3 knows 20 classes and calls a shoe background; these models know no classes and mark
whatever stands out, which is what product photos need. They are the files rembg publishes,
run the way rembg runs them, so a mask matches what sellers already get from rembg:
  - preprocessing: the photo squashed to the model's square input with PIL's Lanczos filter,
    divided by its own brightest value (not by 255), then normalised by the model's mean/std;
  - postprocessing: the first output's map min-max normalised per photo.
The map then comes back at the photo's aspect with its longest side the model's input size,
as DeepLab's do, so refinement, no_subject and every effect treat both families alike. The
input is one square shape, so every batch runs in one call (or photo by photo, where the
file fixes its batch size at 1).
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import cv2
import numpy as np
from PIL import Image

from producer.catalog import SalientName
from producer.errors import WeightsUnavailable
from producer.request import FOREGROUND_CLASSES
from worker.imageio import check_image
from worker.weights import (
    Fetch,
    HashMismatch,
    Pulled,
    Upload,
    _configured_weights,
    cache_dir,
    download_verified,
    stream_digest,
    weights_identity,
)

if TYPE_CHECKING:
    import onnxruntime
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A map whose values span less than this is flat: min-max would blow noise up to a mask.
_FLAT_SPAN = 1e-6
_RELEASES = "https://github.com/danielgatis/rembg/releases/download/v0.0.0"


@dataclass(frozen=True)
class SalientSpec:
    """A published ONNX file and how its publisher feeds it."""

    url: str
    # rembg pins its files by md5 alone (pooch.retrieve(url, "md5:…") in
    # rembg/sessions/<model>.py); no sha256 is published, so the md5 is the pin.
    md5: str
    input_size: int  # the square input's side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def file_name(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name


# Source: danielgatis/rembg at 684f8e9 (2026-07-18), rembg/sessions/u2net.py, u2netp.py and
# dis_general_use.py: URL, md5, input size, mean and std as passed to BaseSession.normalize.
SALIENT_MODELS: dict[SalientName, SalientSpec] = {
    "u2net": SalientSpec(
        f"{_RELEASES}/u2net.onnx",
        "60024c5c889badc19c04ad937298a77b",
        320,
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    "u2netp": SalientSpec(
        f"{_RELEASES}/u2netp.onnx",
        "8e83ca70e441ab06c318d82300c84806",
        320,
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    "isnet-general-use": SalientSpec(
        f"{_RELEASES}/isnet-general-use.onnx",
        "fc16ebd8b0c10d971d3513d564d01e29",
        1024,
        (0.5, 0.5, 0.5),
        (1.0, 1.0, 1.0),
    ),
}


def salient_spec(model_name: str) -> SalientSpec:
    try:
        return SALIENT_MODELS[model_name]  # type: ignore[index]  # a str from the CLI or a test
    except KeyError:
        known = ", ".join(SALIENT_MODELS)
        raise WeightsUnavailable(
            f"unknown salient model {model_name!r}; choose one of {known}"
        ) from None


# --- weights -------------------------------------------------------------------------------


def resolve_salient_weights(
    model_name: str,
    configured: str | None,
    *,
    allow_download: bool = True,
    fetch: Fetch | None = None,
    url: str | None = None,
) -> Path:
    """The local ONNX file to load, found as DeepLab's weights are: BACKDROP_WEIGHTS (a path,
    file:// URI or a location `fetch` downloads), then the cache, then a download of the
    published file. A file bearing the published name must have the pinned md5; a file of
    another name is the operator's own export, held to the signature check alone."""
    spec = salient_spec(model_name)
    if configured:
        path = _configured_weights(configured, fetch)
        if path.name == spec.file_name:
            verify_pin(path, spec)
        return path
    cached = cache_dir() / spec.file_name
    if cached.is_file():
        verify_pin(cached, spec)
        log.debug("weights for %s found in the cache: %s", model_name, cached)
        return cached
    if not allow_download:
        raise WeightsUnavailable(_missing_message(spec, "downloads are disabled"))
    return _download(url or spec.url, cached, spec)


def verify_pin(path: Path, spec: SalientSpec) -> None:
    """Raise unless the file's md5 is the published one."""
    with path.open("rb") as source:
        digest = stream_digest(source, "md5")
    if digest != spec.md5:
        raise WeightsUnavailable(
            f"{path}: md5 {digest} is not the published {spec.md5} of {spec.file_name}; the "
            f"file is corrupt or another one. Delete it and download {spec.url} again, or "
            "give your own export another file name"
        )


def _download(url: str, target: Path, spec: SalientSpec) -> Path:
    log.info("downloading weights %s into %s", url, target)
    try:
        download_verified(url, target, "md5", spec.md5)
    except HashMismatch as exc:
        raise WeightsUnavailable(
            f"refused the download of {url}: {exc}, the published md5 of {spec.file_name}; "
            "the file was corrupted in transit or the mirror serves another file. "
            "Nothing was cached"
        ) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, disk errors, odd URLs
        raise WeightsUnavailable(_missing_message(spec, f"download failed: {exc}")) from None
    return target


def _missing_message(spec: SalientSpec, reason: str) -> str:
    folder = cache_dir()
    return (
        f"no model weights: {spec.file_name} is not in {folder} and {reason}. Fix it with one "
        f"of: download {spec.url} and copy it into {folder}; set "
        f"BACKDROP_WEIGHTS=/path/{spec.file_name} (or s3://bucket/key); or run once with "
        "internet access to download it"
    )


def pull_salient(
    model_name: str, push_to: str | None = None, *, upload: Upload | None = None
) -> Pulled:
    """`backdrop models pull` for an ONNX model: download (or take from the cache) the
    published file, verified against its md5, and optionally upload it below `push_to`."""
    path = resolve_salient_weights(model_name, None)
    with path.open("rb") as source:
        digest = hashlib.file_digest(source, "sha256").hexdigest()
    pushed_to = None
    if push_to:
        if upload is None:
            raise WeightsUnavailable(f"no storage is configured to push to {push_to}")
        pushed_to = f"{push_to.rstrip('/')}/{path.name}"
        log.info("uploading %s to %s", path, pushed_to)
        upload(path, pushed_to)
    return Pulled(model=model_name, path=path, sha256=digest, pushed_to=pushed_to)


# --- the file's signature ------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """What the segmenter needs of a session: its input and first output, and whether a
    call may carry several photos."""

    input_name: str
    output_name: str
    batched: bool


def check_signature(
    session: onnxruntime.InferenceSession, model_name: str, path: Path
) -> Signature:
    """The file's signature, or WeightsUnavailable with the fix when it is not one these
    models have: one float32 (N, 3, S, S) input and a float (N, 1, H, W) first output."""
    spec = salient_spec(model_name)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = f"one float32 input of shape (N, 3, {spec.input_size}, {spec.input_size})"
    if len(inputs) != 1 or not outputs:
        found = f"{len(inputs)} inputs and {len(outputs)} outputs"
        raise WeightsUnavailable(_misfit_message(model_name, path, found, expected))
    first, result = inputs[0], outputs[0]
    shape = list(first.shape)
    found = f"input {first.name!r} {first.type} {_shape_text(shape)}"
    if (
        first.type != "tensor(float)"
        or len(shape) != 4
        or not _fits(shape[1], 3)
        or not (_fits(shape[2], spec.input_size) and _fits(shape[3], spec.input_size))
        or (isinstance(shape[0], int) and shape[0] != 1)
    ):
        raise WeightsUnavailable(_misfit_message(model_name, path, found, expected))
    out_shape = list(result.shape)
    if result.type not in {"tensor(float)", "tensor(float16)"} or (
        len(out_shape) != 4 or not _fits(out_shape[1], 1)
    ):
        found = f"first output {result.name!r} {result.type} {_shape_text(out_shape)}"
        want = "a float first output of shape (N, 1, H, W): one foreground map a photo"
        raise WeightsUnavailable(_misfit_message(model_name, path, found, want))
    return Signature(first.name, result.name, batched=not isinstance(shape[0], int))


def _fits(dimension: object, wanted: int) -> bool:
    """A fixed dimension must be the wanted one; a named (dynamic) one takes anything."""
    return not isinstance(dimension, int) or dimension == wanted


def _shape_text(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _misfit_message(model_name: str, path: Path, found: str, expected: str) -> str:
    spec = salient_spec(model_name)
    others = [
        name
        for name, other in SALIENT_MODELS.items()
        if name != model_name and f", {other.input_size}, {other.input_size})" in found
    ]
    hint = f"set BACKDROP_MODEL={' or '.join(others)}, or " if others else ""
    return (
        f"{path} does not fit {model_name}: it has {found}, not {expected}. Fix: {hint}point "
        f"BACKDROP_WEIGHTS at {model_name}'s published file ({spec.url}) or an export with "
        "that signature, or unset BACKDROP_WEIGHTS to download it"
    )


# --- running -------------------------------------------------------------------------------


def providers_for(device: str) -> list[str]:
    """onnxruntime's execution providers for BACKDROP_DEVICE: "auto" means CUDA when the
    installed onnxruntime has it (onnxruntime-gpu), else the CPU."""
    available = _onnxruntime().get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise WeightsUnavailable(
            "BACKDROP_DEVICE=cuda but onnxruntime has no CUDA execution provider "
            f"(it has {', '.join(available)}): install onnxruntime-gpu instead of onnxruntime"
        )
    if device in {"cuda", "auto"} and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _onnxruntime() -> Any:
    """The onnxruntime module, or WeightsUnavailable saying how to install it: a worker
    installed without the onnx extra runs the DeepLab models only."""
    try:
        import onnxruntime
    except ImportError:
        raise WeightsUnavailable(
            "the salient models run on onnxruntime, which is not installed: "
            "pip install 'backdrop[worker,onnx]' (or onnxruntime-gpu on a GPU worker)"
        ) from None
    return onnxruntime


def open_session(
    path: Path, model_name: str, *, device: str = "cpu", threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An inference session on the file; WeightsUnavailable if it is not a readable model."""
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the graph is one chain: no independent ops to overlap
    try:
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers_for(device)
        )
    except WeightsUnavailable:
        raise
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"{path} is not a readable ONNX model for {model_name} ({reason}); point "
            f"BACKDROP_WEIGHTS at the published file ({salient_spec(model_name).url}) or unset it"
        ) from None


def check_salient_weights(model_name: str, path: Path) -> None:
    """Refuse, with the fix, a file that is not an ONNX model of this signature: before any
    job is taken (the worker's preflight)."""
    check_signature(open_session(path, model_name), model_name, path)


class SalientSegmenter:
    """Batched salient-object inference: the same predict contract as DeepLab's Segmenter."""

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        *,
        name: str,
        weights_id: str,
        path: Path,
    ) -> None:
        """`path`: the file the session was opened on, named in a refusal."""
        self.name = name
        self.weights_id = weights_id
        self.spec = salient_spec(name)
        self.signature = check_signature(session, name, path)
        self._session = session
        self._on_cuda = "CUDAExecutionProvider" in session.get_providers()
        self._warned = False

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        weights: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        fetch: Fetch | None = None,
    ) -> Self:
        """Find the file (see resolve_salient_weights), check it, and open it on the device."""
        started = time.perf_counter()
        path = resolve_salient_weights(model_name, weights, fetch=fetch)
        session = open_session(path, model_name, device=device, threads=threads)
        if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            # onnxruntime falls back to the CPU when the CUDA libraries fail to load.
            raise WeightsUnavailable(
                "BACKDROP_DEVICE=cuda but onnxruntime could not start its CUDA provider "
                "(see its log above: CUDA or cuDNN libraries missing or of another version)"
            )
        segmenter = cls(session, name=model_name, weights_id=weights_identity(path), path=path)
        log.info(
            "loaded %s (%s) on %s in %.1fs",
            model_name,
            segmenter.weights_id,
            ", ".join(session.get_providers()),
            time.perf_counter() - started,
        )
        return segmenter

    @property
    def device(self) -> torch.device:
        """Where the maps are made; a CUDA one also runs the refinement on the GPU."""
        import torch

        return torch.device("cuda" if self._on_cuda else "cpu")

    def predict(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Per image, a float32 map in [0, 1]: how salient each pixel is.

        `classes` are ignored (these models know none): each map covers the image content
        with its longest side the model's input size, like DeepLab's.
        """
        if len(images) != len(classes):
            raise ValueError(f"{len(images)} images but {len(classes)} class lists")
        self._warn_of_classes(classes)
        if not images:
            return []
        for image in images:
            check_image(image)
        batch = np.stack([preprocess(image, self.spec) for image in images])
        if self.signature.batched:
            raw = self._run(batch)
        else:
            raw = np.concatenate([self._run(batch[i : i + 1]) for i in range(len(images))])
        return [
            postprocess(raw[i, 0], image.shape[:2], self.spec.input_size)
            for i, image in enumerate(images)
        ]

    def _warn_of_classes(self, classes: Sequence[Sequence[int]]) -> None:
        """Submission refuses classes where the API runs with this model; a job that still
        selects some (an API configured with a DeepLab model) gets the salient subject."""
        narrower = any(0 < len(set(chosen)) < len(FOREGROUND_CLASSES) for chosen in classes)
        if self._warned or not narrower:
            return
        self._warned = True
        log.warning(
            "%s knows no classes: jobs' classes are ignored (set the API's BACKDROP_MODEL to "
            "the workers' so that it refuses them)",
            self.name,
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self.signature.output_name], {self.signature.input_name: batch})
        return np.asarray(out, dtype=np.float32)


def preprocess(image: np.ndarray, spec: SalientSpec) -> np.ndarray:
    """rembg's BaseSession.normalize: (3, S, S) float32 from an (H, W, 3) uint8 photo."""
    side = spec.input_size
    resized = Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(resized, dtype=np.float64)
    pixels /= max(float(pixels.max()), 1e-6)
    pixels -= spec.mean
    pixels /= spec.std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def postprocess(raw: np.ndarray, photo_shape: tuple[int, ...], side: int) -> np.ndarray:
    """The model's map min-max normalised, at the photo's aspect (longest side `side`)."""
    low, high = float(raw.min()), float(raw.max())
    span = high - low
    # A flat map has no salient region to stretch: keep its level (the models end in a
    # sigmoid, so it is already a probability) rather than divide by zero.
    unit = (raw - low) / span if span > _FLAT_SPAN else raw
    h, w = photo_shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    fitted = cv2.resize(unit.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    return np.clip(fitted, 0.0, 1.0)
