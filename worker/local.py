"""`backdrop process`: local files through the workers' imaging path, no queue; the model
is loaded once, on the first photo that needs it, for every photo of the call."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from producer.errors import BackdropError, BackgroundNotFound, InputNotFound
from producer.locations import FILE_SCHEME, real_path
from producer.outputs import STDIO, Pair
from producer.request import Effect, JobRequest, parse_request
from producer.settings import Settings
from worker.imageio import decode_image, decode_mask
from worker.pipeline import Segment, Timings, alpha_for, render

log = logging.getLogger(__name__)
# The location a request names for a photo read from stdin (nothing is read through it).
STDIN_LOCATION = "file:///dev/stdin"


def _read(path: Path, missing: type[InputNotFound] | type[BackgroundNotFound], what: str) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise missing(f"{what} {path} does not exist") from None


def _local_path(value: str) -> Path:
    return real_path(value) if value.startswith(FILE_SCHEME) else Path(value)


class LocalProcessor:
    """Processes photos one after another with the same job fields and one model."""

    def __init__(self, settings: Settings, fields: dict[str, Any]) -> None:
        self._settings = settings
        self._fields = dict(fields)
        self._limits = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_input_bytes}
        self._segment: Segment | None = None
        self._background: Any = None
        self._background_path: Path | None = None
        if self._fields.get("effect") == Effect.REPLACE and self._fields.get("background"):
            self._background_path = _local_path(self._fields["background"]).resolve()
            self._fields["background"] = self._background_path.as_uri()

    def process(
        self, pair: Pair, *, mask_file: Path | None = None, save_mask: Path | None = None
    ) -> dict[str, float]:
        """Process one photo into its output; returns the stage timings in ms."""
        source = STDIN_LOCATION if pair.input == STDIO else Path(pair.input).resolve().as_uri()
        request = parse_request({**self._fields, "format": pair.format, "input": source})
        timings = Timings()
        with timings.stage("decode"):
            data = (
                sys.stdin.buffer.read()
                if pair.input == STDIO
                else _read(Path(pair.input), InputNotFound, "input")
            )
            photo = decode_image(data, **self._limits)
            coarse = None
            if mask_file is not None:
                with _named("mask"):
                    coarse = decode_mask(_read(mask_file, InputNotFound, "mask"), **self._limits)
            background = self._background_for(request)
        segment = None if coarse is not None else self._segmenter()
        alpha = alpha_for(photo, request, timings, segment=segment, coarse_mask=coarse)  # type: ignore[arg-type]
        rendered = render(
            photo, alpha, request, timings, background=background, want_mask=bool(save_mask)
        )
        _write(pair.output, rendered.image)
        if save_mask is not None and rendered.mask is not None:
            _write(str(save_mask), rendered.mask)
        log.info("processed %s in %s", pair.input, timings.ms)
        return timings.ms

    def _background_for(self, request: JobRequest) -> Any:
        if request.effect != Effect.REPLACE or self._background_path is None:
            return None
        if self._background is None:
            data = _read(self._background_path, BackgroundNotFound, "background")
            with _named("background"):
                self._background = decode_image(data, **self._limits).rgb
        return self._background

    def _segmenter(self) -> Segment:
        if self._segment is None:
            from worker.tasks import load_segmenter

            segmenter = load_segmenter(self._settings)
            self._segment = lambda rgb, classes: segmenter.predict([rgb], [classes])[0]
        return self._segment


@contextmanager
def _named(what: str) -> Iterator[None]:
    """Say which file a decoding error is about: the photo's are plain, others say so."""
    try:
        yield
    except BackdropError as exc:
        if exc.message.startswith(what):
            raise
        raise type(exc)(f"{what}: {exc.message}") from None


def _write(output: str, data: bytes) -> None:
    if output == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
