"""`backdrop process`: local files through the workers' imaging path, no queue; the model
is loaded once, on the first photo that needs it, for every photo of the call."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from producer.catalog import refuse_classes
from producer.errors import InputNotFound
from producer.locations import FILE_SCHEME, real_path
from producer.outputs import STDIO, Pair
from producer.request import Effect, parse_request
from producer.settings import Settings
from producer.storage import Storage
from worker.pipeline import Imaging, Reader, Timings, store
from worker.salient import SalientSegmenter
from worker.segmenter import Segmenter, load_segmenter

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

log = logging.getLogger(__name__)
# The location a request names for a photo read from stdin (never opened as a file).
STDIN_LOCATION = "file:///dev/stdin"


def _location(path: str | Path) -> str:
    return Path(path).resolve().as_uri()


def read_local(location: str) -> bytes:
    """A file:// location's bytes."""
    path = real_path(location)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InputNotFound(f"{path} does not exist") from None


def _with_stdin_at(stdin_location: str) -> Reader:
    """read_local, but stdin's bytes for the (canonicalised) location standing for stdin."""

    def read(location: str) -> bytes:
        return sys.stdin.buffer.read() if location == stdin_location else read_local(location)

    return read


def write_local(output: str, data: bytes, _content_type: str) -> None:
    """A file (its folder created), or stdout for '-'."""
    if output == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class LocalProcessor:
    """Processes photos one after another with the same job fields and one model."""

    def __init__(self, settings: Settings, fields: dict[str, Any]) -> None:
        self._settings = settings
        self._fields = dict(fields)
        self._segmenter: Segmenter | SalientSegmenter | None = None
        self._imaging = Imaging(
            self._segment,
            device=self._device,
            max_pixels=settings.max_pixels,
            max_bytes=settings.max_input_bytes,
        )
        background = self._fields.get("background")
        if self._fields.get("effect") == Effect.REPLACE and background:
            path = real_path(background) if background.startswith(FILE_SCHEME) else background
            self._fields["background"] = _location(path)

    def process(
        self, pair: Pair, *, mask_file: Path | None = None, save_mask: Path | None = None
    ) -> dict[str, float]:
        """Process one photo into its output; returns the stage timings in ms."""
        fields = {
            **self._fields,
            "format": pair.format,
            "input": STDIN_LOCATION if pair.input == STDIO else _location(pair.input),
        }
        if mask_file is not None:
            fields["mask"] = _location(mask_file)
        request = parse_request(fields)
        refuse_classes(request.classes, self._settings.model)
        read = read_local if pair.input != STDIO else _with_stdin_at(request.input)
        timings = Timings()
        rendered = self._imaging.process(request, read, timings, want_mask=save_mask is not None)
        mask_output = None if save_mask is None else str(save_mask)
        store(rendered, write_local, output=pair.output, mask_output=mask_output, fmt=pair.format)
        log.info("processed %s in %s", pair.input, timings.ms)
        return timings.ms

    def _segment(self, rgb: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        if self._segmenter is None:
            fetch = Storage(self._settings).download_file
            self._segmenter = load_segmenter(self._settings, fetch=fetch)
        return self._segmenter.predict([rgb], [classes])[0]

    def _device(self) -> torch.device | None:
        return None if self._segmenter is None else self._segmenter.device
