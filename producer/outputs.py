"""Local outputs of `backdrop process`: the format an output path asks for, and where each
input's result goes when several inputs (or a folder) are processed into a folder."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from producer.errors import InputNotFound, InvalidRequest
from producer.formats import OutputFormat, choices

STDIO = "-"
# What a folder input contributes: the photo formats the workers decode.
PHOTO_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif", ".avif"}
)


@dataclass(frozen=True)
class Pair:
    input: str  # a file path, or "-" for stdin
    output: str  # a file path, or "-" for stdout
    format: str


def format_for(output: str, fmt: str | None) -> str:
    """The format an output file gets: its extension's, which a conflicting --format or an
    extension that is no image format refuse; a name without one (or stdout) takes --format."""
    suffix = Path(output).suffix.lower().lstrip(".") if output != STDIO else ""
    if not suffix:
        if fmt is None and output != STDIO:
            raise InvalidRequest(f"{output} has no extension: {choices()}, or give --format")
        return fmt or OutputFormat.PNG.value
    try:
        by_suffix = OutputFormat(suffix).value
    except ValueError:
        raise InvalidRequest(f"{output}: .{suffix} is not an output format; {choices()}") from None
    if fmt is not None and fmt != by_suffix:
        raise InvalidRequest(f"--format {fmt} conflicts with the extension of {output}")
    return by_suffix


def plan_outputs(inputs: tuple[str, ...], output: str, fmt: str | None) -> list[Pair]:
    """One file (or stdin) in: OUTPUT is the file. Several, or a folder: OUTPUT is a folder
    and each photo keeps its name (its path under a folder input), with the format's
    extension; two photos that would share a name (cat.jpg, cat.png) keep their own
    extension in it (cat.jpg.png)."""
    if len(inputs) == 1 and (inputs[0] == STDIO or not Path(inputs[0]).is_dir()):
        source = inputs[0]
        if source != STDIO and not Path(source).is_file():
            raise InputNotFound(f"{source} does not exist")
        return [Pair(source, output, format_for(output, fmt))]
    if STDIO in inputs:
        raise InvalidRequest("'-' (stdin) is for one input, not with others")
    if output == STDIO:
        raise InvalidRequest("several inputs or a folder go to an OUTPUT folder, not '-'")
    if Path(output).is_file():
        raise InvalidRequest(f"{output} is a file; several inputs need an OUTPUT folder")
    fmt = fmt or OutputFormat.PNG.value
    named = [(path, name) for source in inputs for path, name in _photos(Path(source))]
    if not named:
        raise InputNotFound(f"no photos in {', '.join(inputs)}")
    stems = Counter(str(Path(name).with_suffix("")) for _, name in named)
    pairs = []
    for path, name in named:
        stem = Path(name).with_suffix("")
        kept = name if stems[str(stem)] > 1 else str(stem)
        pairs.append(
            Pair(str(path), str(Path(output) / f"{kept}.{OutputFormat(fmt).extension}"), fmt)
        )
    return pairs


def _photos(source: Path) -> list[tuple[Path, str]]:
    """(path, name under the output folder) for a file, or every photo under a folder."""
    if source.is_file():
        return [(source, source.name)]
    if not source.is_dir():
        raise InputNotFound(f"{source} does not exist")
    return [
        (path, str(path.relative_to(source)))
        for path in sorted(source.rglob("*"))
        if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES
    ]
