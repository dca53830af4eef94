"""`backdrop process`: one local file through the workers' imaging path, no queue."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from producer.errors import BackgroundNotFound, InputNotFound
from producer.request import Effect, parse_request
from producer.settings import Settings
from worker.imageio import decode_image, decode_mask
from worker.pipeline import Timings, alpha_for, render

log = logging.getLogger(__name__)


def _read(path: Path, missing: type[InputNotFound] | type[BackgroundNotFound]) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise missing(f"{path} does not exist") from None


def _as_uri(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()


def _local_path(location: str) -> Path:
    return (
        Path(location.removeprefix("file://")) if location.startswith("file://") else Path(location)
    )


def process_file(
    input_file: Path,
    output_file: Path,
    fields: dict[str, Any],
    *,
    settings: Settings,
    mask_file: Path | None = None,
    save_mask: Path | None = None,
) -> dict[str, float]:
    """Process INPUT_FILE into OUTPUT_FILE; returns the stage timings in ms."""
    if fields.get("effect") == Effect.REPLACE and fields.get("background"):
        fields = {**fields, "background": _as_uri(fields["background"])}
    request = parse_request(
        {**fields, "input": input_file.resolve().as_uri(), "output": output_file.resolve().as_uri()}
    )
    limits = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_input_bytes}
    timings = Timings()
    with timings.stage("decode"):
        photo = decode_image(_read(input_file, InputNotFound), **limits)
        coarse = decode_mask(_read(mask_file, InputNotFound), **limits) if mask_file else None
        background = None
        if request.effect == Effect.REPLACE:
            data = _read(_local_path(request.background or ""), BackgroundNotFound)
            background = decode_image(data, **limits).rgb
    segment = None
    if coarse is None:
        from worker.tasks import load_segmenter

        segmenter = load_segmenter(settings)
        segment = lambda rgb, classes: segmenter.predict([rgb], [classes])[0]  # noqa: E731
    alpha = alpha_for(photo, request, timings, segment=segment, coarse_mask=coarse)  # type: ignore[arg-type]
    rendered = render(
        photo, alpha, request, timings, background=background, want_mask=bool(save_mask)
    )
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.write_bytes(rendered.image)
    if save_mask is not None and rendered.mask is not None:
        save_mask.parent.mkdir(parents=True, exist_ok=True)
        save_mask.write_bytes(rendered.mask)
    log.info("processed %s in %s", input_file, timings.ms)
    return timings.ms
