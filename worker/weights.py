"""Model weights: find the state-dict file, build the architecture around it, name it.

Workers often run without internet, so every way of getting weights fails with one
actionable message (WeightsUnavailable) instead of a torch or urllib traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torchvision.models import segmentation

from producer.catalog import DeepLabName
from producer.errors import TransientError, WeightsUnavailable

log = logging.getLogger(__name__)

# Downloads a non-local location (s3://…) into a local path; the worker passes its storage's.
Fetch = Callable[[str, Path], None]

NUM_CLASSES = 21  # Pascal VOC: background plus 20 classes
DOWNLOAD_TIMEOUT_S = 30.0
# torchvision's published file names end in "-<first hex digits of the sha256>.pth".
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., torch.nn.Module]
    weights: Any  # the torchvision *_Weights.COCO_WITH_VOC_LABELS_V1 enum member

    @property
    def url(self) -> str:
        url: str = self.weights.url
        return url

    @property
    def file_name(self) -> str:
        return _url_file_name(self.url)


# One spec per DeepLabV3 name of the registry that settings validates against (producer.catalog);
# the class-agnostic ones are worker/salient.py's.
MODELS: dict[DeepLabName, ModelSpec] = {
    "deeplabv3_resnet101": ModelSpec(
        segmentation.deeplabv3_resnet101,
        segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "deeplabv3_resnet50": ModelSpec(
        segmentation.deeplabv3_resnet50,
        segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "deeplabv3_mobilenet_v3_large": ModelSpec(
        segmentation.deeplabv3_mobilenet_v3_large,
        segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
}


def model_spec(model_name: str) -> ModelSpec:
    try:
        return MODELS[model_name]  # type: ignore[index]  # a str from the CLI or a test
    except KeyError:
        known = ", ".join(MODELS)
        raise WeightsUnavailable(f"unknown model {model_name!r}; choose one of {known}") from None


def cache_dir() -> Path:
    """Where torch.hub keeps downloaded checkpoints (follows TORCH_HOME and hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# --- resolving -----------------------------------------------------------------------------


def resolve_weights(
    model_name: str,
    configured: str | None,
    *,
    allow_download: bool = True,
    fetch: Fetch | None = None,
    url: str | None = None,
) -> Path:
    """The local state-dict file to load for a model.

    Order: the configured location (BACKDROP_WEIGHTS: a path, file:// URI, or anything `fetch`
    can download), then the torch hub cache, then a download of `url` (the published file by
    default) whose sha256 must start with the hash prefix in its file name.
    """
    spec = model_spec(model_name)
    if configured:
        return _configured_weights(configured, fetch)
    url = url or spec.url
    file_name = _url_file_name(url)
    cached = cache_dir() / file_name
    if cached.is_file():
        log.debug("weights for %s found in the cache: %s", model_name, cached)
        return cached
    if not allow_download:
        raise WeightsUnavailable(_missing_message(file_name, "downloads are disabled"))
    return _download(url, cached)


def _configured_weights(location: str, fetch: Fetch | None) -> Path:
    local = _local_path(location)
    if local is not None:
        if not local.is_file():
            raise WeightsUnavailable(
                f"BACKDROP_WEIGHTS={location} is not a file; point it at a state-dict .pth file "
                "or unset it to use the torch hub cache"
            )
        return local
    if fetch is None:
        raise WeightsUnavailable(
            f"BACKDROP_WEIGHTS={location} is not a local file and no storage is configured to "
            "fetch it; use a local path or file:// URI"
        )
    return _fetched_weights(location, fetch)


def _local_path(location: str) -> Path | None:
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if not parsed.scheme or len(parsed.scheme) == 1:  # one letter: a Windows drive
        return Path(location).expanduser()
    return None


def _fetched_weights(location: str, fetch: Fetch) -> Path:
    # Keyed by the location so two workers (or preflight and the model load) fetch it once.
    key = hashlib.sha256(location.encode()).hexdigest()[:12]
    name = location.rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    target = cache_dir() / "backdrop" / key / name
    if target.is_file():
        return target
    log.info("fetching weights %s into %s", location, target)
    # Fetched beside the target and renamed only once verified: a half-fetched or tampered
    # file never sits in the cache where the next start would trust it.
    partial = target.with_name(f".{target.name}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetch(location, partial)
    except TransientError:
        partial.unlink(missing_ok=True)
        raise  # the store is down, not the configuration wrong: let the caller retry
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise WeightsUnavailable(
            f"could not fetch BACKDROP_WEIGHTS={location}: {exc}; check the location and the "
            "worker's storage credentials"
        ) from None
    if not partial.is_file():
        raise WeightsUnavailable(f"fetching BACKDROP_WEIGHTS={location} produced no file")
    try:
        verify_hash_prefix(partial, name)
    except WeightsUnavailable:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target


def verify_hash_prefix(path: Path, name: str | None = None) -> str:
    """The file's sha256; raises if its name (torchvision style, `-<hex>.pth`) promises
    another. A name without a hash prefix promises nothing and is not checked."""
    name = name or path.name
    digest = _sha256(path)
    match = _HASH_PREFIX.search(name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsUnavailable(
            f"{name}: sha256 {digest[:12]}… does not start with {match.group(1)} as its name "
            "says; the file is corrupt or not the published one. Nothing was cached"
        )
    return digest


def _sha256(path: Path) -> str:
    with path.open("rb") as source:
        return stream_digest(source)


def stream_digest(
    source: BinaryIO, algorithm: str = "sha256", copy_to: BinaryIO | None = None
) -> str:
    """The digest of a stream read to its end in 1 MiB chunks, each also written to `copy_to`."""
    # A checksum against corruption, as the publishers give it (md5 for rembg's files).
    digest = hashlib.new(algorithm, usedforsecurity=False)
    while chunk := source.read(1 << 20):
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path) -> Path:
    match = _HASH_PREFIX.search(target.name)
    if match is None:
        raise WeightsUnavailable(
            f"cannot verify a download of {url}: its file name carries no sha256 prefix"
        )
    log.info("downloading weights %s into %s", url, target)
    try:
        download_verified(url, target, "sha256", match.group(1))
    except HashMismatch as exc:
        raise WeightsUnavailable(
            f"refused the download of {url}: {exc}; the file was corrupted in transit or the "
            "mirror serves another file. Nothing was cached"
        ) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, disk errors, odd URLs
        raise WeightsUnavailable(_missing_message(target.name, f"download failed: {exc}")) from None
    return target


class HashMismatch(Exception):
    """A downloaded file's digest is not the pinned one."""


def download_verified(url: str, target: Path, algorithm: str, pinned: str) -> None:
    """Stream into a temporary file beside the target; it replaces the target only if its
    digest starts with `pinned` (a whole digest, or torchvision's prefix in a file name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            actual = stream_digest(response, algorithm, copy_to=out)
        if not actual.startswith(pinned):
            raise HashMismatch(f"{algorithm} {actual[:12]}… does not start with {pinned}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _missing_message(file_name: str, reason: str) -> str:
    folder = cache_dir()
    return (
        f"no model weights: {file_name} is not in {folder} and {reason}. Fix it with one of: "
        f"copy {file_name} into {folder}; set BACKDROP_WEIGHTS=/path/{file_name} "
        f"(or s3://bucket/key); or run once with internet access to download it"
    )


def _url_file_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


# --- loading -------------------------------------------------------------------------------


def load_model(model_name: str, weights_path: Path) -> torch.nn.Module:
    """Build the architecture, load the file strictly, and drop the unused aux head."""
    state = _read_state_dict(weights_path, model_name)
    model = _build(model_name, state)
    problem = _mismatch(model.state_dict(), state)
    if problem:
        raise WeightsUnavailable(_misfit_message(model_name, weights_path, state, problem))
    model.load_state_dict(state, strict=True)
    # Training-only head: inference never reads it, so don't pay for it.
    # torch's __setattr__ annotation leaves out the None it accepts for a registered submodule.
    model.aux_classifier = None  # type: ignore[assignment]
    return model.eval()


def check_weights(model_name: str, weights_path: Path) -> None:
    """Refuse, with the fix, a file that will not load into the model: before any job is taken.

    Costs no weights memory: the file is memory-mapped and the architecture built on the meta
    device, so only names and shapes are compared.
    """
    state = _read_state_dict(weights_path, model_name, mmap=True)
    with torch.device("meta"):
        expected = _build(model_name, state).state_dict()
    problem = _mismatch(expected, state)
    if problem:
        raise WeightsUnavailable(_misfit_message(model_name, weights_path, state, problem))


def fitting_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the architecture a state dict fits, if any of ours."""
    for name in MODELS:
        with torch.device("meta"):
            expected = _build(name, state).state_dict()
        if not _mismatch(expected, state):
            return name
    return None


def _build(model_name: str, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    has_aux = any(key.startswith("aux_classifier.") for key in state)
    return model_spec(model_name).builder(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=has_aux
    )


def _misfit_message(
    model_name: str, path: Path, state: Mapping[str, torch.Tensor], problem: str
) -> str:
    other = fitting_model(state)
    if other is not None:
        return (
            f"{path} holds {other} weights, but the model is {model_name}: set "
            f"BACKDROP_MODEL={other}, or point BACKDROP_WEIGHTS at a {model_name} file"
        )
    return f"{path} does not fit {model_name}: {problem}"


def _read_state_dict(path: Path, model_name: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"{path} is not a readable PyTorch state dict for {model_name} ({reason})"
        ) from None
    state = _unwrap(loaded)
    if state is None:
        raise WeightsUnavailable(
            f"{path} holds a {type(loaded).__name__}, not a state dict of tensors for {model_name}"
        )
    return state


def _unwrap(loaded: object) -> dict[str, torch.Tensor] | None:
    """The tensors of a plain state dict or of a training checkpoint that wraps one."""
    if not isinstance(loaded, Mapping):
        return None
    found: Mapping[object, object] = loaded
    for key in ("state_dict", "model"):
        inner = found.get(key)
        if isinstance(inner, Mapping):
            found = inner
            break
    if not found or not all(isinstance(v, torch.Tensor) for v in found.values()):
        return None
    tensors = cast(Mapping[object, torch.Tensor], found)  # every value checked just above
    # DataParallel / DDP checkpoints prefix every key.
    if all(str(k).startswith("module.") for k in tensors):
        return {str(k)[len("module.") :]: v for k, v in tensors.items()}
    return {str(k): v for k, v in tensors.items()}


def _mismatch(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]) -> str:
    """A short account of why a state dict doesn't fit, or "" when it does."""
    missing = sorted(expected.keys() - actual.keys())
    unexpected = sorted(actual.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(actual[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & actual.keys()
        if actual[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {', '.join(sorted(shapes)[:2])})")
    if parts:
        parts.append("is it a file for another architecture or number of classes?")
    return "; ".join(parts)


# --- identity ------------------------------------------------------------------------------

_identities: dict[tuple[str, int, int], str] = {}
_identities_lock = threading.Lock()


def weights_identity(path: Path) -> str:
    """`<file name>@sha256:<12 hex>`: names the exact weights a job ran with."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _identities_lock:
        cached = _identities.get(key)
    if cached is not None:
        return cached
    identity = f"{path.name}@sha256:{_sha256(path)[:12]}"
    with _identities_lock:
        _identities[key] = identity
    return identity


# --- pulling for offline clusters ----------------------------------------------------------

# Uploads a local file to a location (s3://…); the CLI passes its storage's upload_file.
Upload = Callable[[Path, str], None]


@dataclass(frozen=True)
class Pulled:
    model: str
    path: Path
    sha256: str
    pushed_to: str | None  # the BACKDROP_WEIGHTS value for workers, when pushed


def pull(
    model_name: str,
    push_to: str | None = None,
    *,
    upload: Upload | None = None,
    url: str | None = None,
) -> Pulled:
    """Download (or take from the torch hub cache) a model's published weights, verify them
    against the sha256 prefix in their file name, and optionally upload them, under the same
    name, below the `push_to` prefix: workers given that location verify them again."""
    path = resolve_weights(model_name, None, url=url)
    # The cache may hold a file that predates the verified download: check it all the same.
    digest = verify_hash_prefix(path)
    pushed_to = None
    if push_to:
        if upload is None:
            raise WeightsUnavailable(f"no storage is configured to push to {push_to}")
        pushed_to = f"{push_to.rstrip('/')}/{path.name}"
        log.info("uploading %s to %s", path, pushed_to)
        upload(path, pushed_to)
    return Pulled(model=model_name, path=path, sha256=digest, pushed_to=pushed_to)
