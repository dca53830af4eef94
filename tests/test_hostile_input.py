"""A corpus of hostile and broken inputs, generated here, fed end to end through a real worker.

Each kind ends with its error code and a readable message, or a correct output; the worker
never crashes, no job is left open, and the worker's memory stays bounded throughout.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.stack import Stack, build_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_INPUT_BYTES = 3_000_000
MAX_PIXELS = 8_000_000
# Peak resident memory the worker may reach while eating the corpus (model and torch included).
MEMORY_BOUND_BYTES = 1_500 * 1024 * 1024


def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def quadrants(width: int = 48, height: int = 32) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 2] = (255, 0, 0)
    rgb[: height // 2, width // 2 :] = (0, 255, 0)
    rgb[height // 2 :, : width // 2] = (0, 0, 255)
    rgb[height // 2 :, width // 2 :] = (255, 255, 255)
    return rgb


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header declares a huge image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


def bomb_jpeg(width: int, height: int) -> bytes:
    """A real JPEG with its frame header's dimensions rewritten to something huge."""
    data = bytearray(save(Image.fromarray(quadrants()), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_gif(width: int, height: int) -> bytes:
    data = bytearray(save(Image.fromarray(quadrants()).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(quadrants()), "JPEG", quality=95, exif=exif)


def corrupt_exif() -> bytes:
    valid = save(Image.fromarray(quadrants()), "JPEG", quality=95)
    garbage = b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff\xff\xff" + b"\xab" * 40
    return valid[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + valid[2:]


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.roll(quadrants(), shift, axis=1)) for shift in (0, 8, 16)]
    if fmt == "GIF":
        frames = [frame.convert("P") for frame in frames]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_with_transparency() -> bytes:
    image = Image.fromarray(quadrants()).convert("P")
    return save(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    return save(Image.fromarray(ramp), "PNG")


def noise_over_the_byte_limit() -> bytes:
    return np.random.default_rng(0).integers(0, 255, MAX_INPUT_BYTES + 1, np.uint8).tobytes()


def zip_file() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", b"not really")
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    make: Callable[[], bytes]
    code: str | None  # None: must succeed
    size: tuple[int, int] | None = None  # the output's (width, height) when it succeeds
    key: str = "input.bin"
    fields: dict[str, Any] = field(default_factory=dict)
    role: str = "input"  # which location carries the hostile bytes: input, background, mask


PHOTO = lambda: save(Image.fromarray(quadrants()), "PNG")  # noqa: E731

CORPUS: dict[str, Case] = {
    "zero-bytes": Case(lambda: b"", "invalid_image"),
    "truncated-jpeg": Case(
        lambda: save(Image.fromarray(quadrants(400, 300)), "JPEG")[:700], "invalid_image"
    ),
    "truncated-png": Case(lambda: PHOTO()[:70], "invalid_image"),
    "png-named-jpg": Case(PHOTO, None, (48, 32), key="photo.jpg"),
    "jpeg-named-png": Case(
        lambda: save(Image.fromarray(quadrants()), "JPEG"), None, (48, 32), key="photo.png"
    ),
    "text": Case(lambda: b"just some words, no picture\n" * 20, "invalid_image", key="a.jpg"),
    "html": Case(lambda: b"<!DOCTYPE html><html><body>x</body></html>", "invalid_image"),
    "svg": Case(lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "invalid_image"),
    "pdf": Case(lambda: b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\ntrailer\n%%EOF\n", "invalid_image"),
    "zip": Case(zip_file, "invalid_image"),
    "png-bomb": Case(lambda: bomb_png(100_000, 100_000), "input_too_large"),
    "jpeg-bomb": Case(lambda: bomb_jpeg(60_000, 60_000), "input_too_large"),
    "gif-bomb": Case(lambda: bomb_gif(65_535, 65_535), "input_too_large"),
    "over-the-byte-limit": Case(noise_over_the_byte_limit, "input_too_large"),
    "one-by-one": Case(lambda: save(Image.new("RGB", (1, 1), "red"), "PNG"), None, (1, 1)),
    "one-by-sixty": Case(lambda: save(Image.new("RGB", (1, 60), "red"), "PNG"), None, (1, 60)),
    "one-by-five-hundred": Case(
        lambda: save(Image.new("RGB", (1, 500), "red"), "PNG"), "invalid_image"
    ),
    "zero-width": Case(lambda: bomb_png(0, 10), "invalid_image"),
    "sixteen-bit-grey": Case(sixteen_bit, None, (48, 32)),
    "cmyk-jpeg": Case(
        lambda: save(Image.fromarray(quadrants()).convert("CMYK"), "JPEG"), None, (48, 32)
    ),
    "palette-with-transparency": Case(palette_with_transparency, None, (48, 32)),
    "grey-with-alpha": Case(
        lambda: save(Image.fromarray(quadrants()).convert("LA"), "PNG"), None, (48, 32)
    ),
    "float-tiff": Case(
        lambda: save(Image.fromarray(quadrants()).convert("F"), "TIFF"), None, (48, 32)
    ),
    "animated-gif": Case(lambda: animated("GIF"), None, (48, 32)),
    "animated-webp": Case(lambda: animated("WEBP"), None, (48, 32)),
    **{
        f"exif-orientation-{n}": Case(
            lambda n=n: with_orientation(n), None, (48, 32) if n <= 4 else (32, 48)
        )
        for n in range(1, 9)
    },
    "corrupt-exif": Case(corrupt_exif, None, (48, 32)),
    "trailing-garbage": Case(lambda: PHOTO() + b"\x00garbage" * 100, None, (48, 32)),
    "ico": Case(lambda: save(Image.new("RGB", (16, 16)), "ICO"), "unsupported_format"),
    "ppm": Case(lambda: save(Image.new("RGB", (16, 16)), "PPM"), "unsupported_format"),
    "broken-background": Case(
        lambda: b"GIF89a broken", "invalid_image", role="background", fields={"effect": "replace"}
    ),
    "bomb-background": Case(
        lambda: bomb_png(100_000, 100_000),
        "input_too_large",
        role="background",
        fields={"effect": "replace"},
    ),
    "mask-of-the-wrong-size": Case(
        lambda: save(Image.new("L", (7, 300), 255), "PNG"), None, (48, 32), role="mask"
    ),
    "broken-mask": Case(lambda: b"\x89PNG\r\n\x1a\nnope", "invalid_image", role="mask"),
}


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(
        tmp_path_factory.mktemp("hostile"),
        s3_server,
        mobilenet_weights,
        BACKDROP_MAX_INPUT_BYTES=str(MAX_INPUT_BYTES),
        BACKDROP_MAX_PIXELS=str(MAX_PIXELS),
    )
    try:
        stack.start_workers(1)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def outcomes(stack: Stack) -> dict[str, dict[str, Any]]:
    """Every kind submitted at once (they share batches), run to a final state."""
    photo = stack.upload("hostile/photo.png", PHOTO())
    requests = []
    for name, case in CORPUS.items():
        hostile = stack.upload(f"hostile/{name}/{case.key}", case.make())
        request: dict[str, Any] = {"input": photo, **case.fields}
        if case.role == "input":
            request["input"] = hostile
        elif case.role == "background":
            request["background"] = hostile
        else:
            request["mask"] = hostile
        requests.append(request)
    job_ids = stack.submit(requests)
    records = stack.wait_final(job_ids, timeout=180)
    return {name: records[job_id] for name, job_id in zip(CORPUS, job_ids, strict=True)}


def test_the_corpus_covers_at_least_25_kinds() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_hostile_input_ends_with_its_code_or_a_correct_output(
    name: str, outcomes: dict[str, dict[str, Any]], stack: Stack
) -> None:
    case, record = CORPUS[name], outcomes[name]
    if case.code is None:
        assert record["status"] == "succeeded", record["error"]
        output = Image.open(io.BytesIO(stack.storage.read(record["output"])))
        assert output.size == case.size
        assert record["input_size"] == list(case.size)
    else:
        assert record["status"] == "failed"
        assert record["error"]["code"] == case.code, record["error"]
        message = record["error"]["message"]
        assert 5 <= len(message) < 500 and "Traceback" not in message
        assert not stack.storage.exists(record["output"])
    assert record["attempts"] == 1


def test_the_worker_survives_the_corpus_with_bounded_memory(
    outcomes: dict[str, dict[str, Any]], stack: Stack
) -> None:
    (worker,) = stack.workers
    assert worker.alive
    status = Path(f"/proc/{worker.pid}/status").read_text()
    peak_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
    )
    assert peak_kib * 1024 < MEMORY_BOUND_BYTES
    print(f"\nFIGURE worker peak RSS over the hostile corpus: {peak_kib / 1024:.0f} MiB")
    assert "Traceback" not in worker.log()
