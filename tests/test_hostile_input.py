"""A corpus of hostile and broken inputs, generated here, fed end to end through a real worker.

Each kind ends with its error code and a readable message, or a correct output: the same
pixels the worker makes of a plain PNG of what the input shows (upright, 8-bit RGB, first
frame, transparency on white), submitted alongside it. The worker never crashes, no job is
left open, and the worker's memory stays bounded throughout.
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

from tests.support.stack import Stack, build_stack
from worker.imageio import ACCEPTED_FORMATS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_INPUT_BYTES = 3_000_000
MAX_PIXELS = 8_000_000
# The batch a photo shares changes float summation order in the model, and so an output
# pixel by a level or two; a wrong decode changes whole regions.
BATCH_NOISE_LEVELS = 2
# Peak resident memory the worker may reach while eating the corpus (model and torch included).
MEMORY_BOUND_BYTES = 1_500 * 1024 * 1024
RED = (255, 0, 0)


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


def solid(width: int, height: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), colour, np.uint8)


def grey(rgb: np.ndarray) -> np.ndarray:
    """Rec.601 luma in all three channels: how a grey image looks in RGB."""
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)


def stored(data: bytes) -> np.ndarray:
    """A file's first frame as stored (no EXIF orientation), decoded by Pillow: the
    reference decode of what its encoder kept."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """How a viewer shows stored pixels under an EXIF orientation (the TIFF 6.0 table)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left to right
        3: lambda a: a[::-1, ::-1],  # turned half way
        4: lambda a: a[::-1],  # mirrored top to bottom
        5: lambda a: a.transpose(1, 0, 2),  # rows become columns
        6: lambda a: np.rot90(a, -1),  # turned a quarter clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a),  # turned a quarter anticlockwise
    }[orientation](pixels)


def truncated_grey(data: bytes) -> np.ndarray:
    """Float pixels cut to 8 bits as Pillow's F -> L does (truncated: at most a level darker
    than rounding would be), in all three channels."""
    with Image.open(io.BytesIO(data)) as image:
        floats = np.asarray(image, np.float32)
    eight = np.clip(floats, 0, 255).astype(np.uint8)
    return np.repeat(eight[:, :, None], 3, axis=2)


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
    """The red quadrant's palette entry is the transparent one."""
    image = Image.fromarray(quadrants()).convert("P")
    return save(image, "PNG", transparency=image.getpixel((0, 0)))


def red_on_white() -> np.ndarray:
    rgb = quadrants()
    rgb[:16, :24] = 255
    return rgb


def ramp() -> np.ndarray:
    return np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)


def sixteen_bit() -> bytes:
    return save(Image.fromarray(ramp()), "PNG")


def ramp_in_eight_bits() -> np.ndarray:
    """Scaled from the full 16-bit range, not clipped at 255."""
    eight = np.round(ramp() * (255 / 65535)).astype(np.uint8)
    return np.repeat(eight[:, :, None], 3, axis=2)


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
    # When it succeeds: the upright 8-bit RGB pixels the made bytes show.
    looks: Callable[[bytes], np.ndarray] | None = None
    key: str = "input.bin"
    fields: dict[str, Any] = field(default_factory=dict)
    role: str = "input"  # which location carries the hostile bytes: input, background, mask


PHOTO = lambda: save(Image.fromarray(quadrants()), "PNG")  # noqa: E731
QUADRANTS = lambda _: quadrants()  # noqa: E731

CORPUS: dict[str, Case] = {
    "zero-bytes": Case(lambda: b"", "invalid_image"),
    "truncated-jpeg": Case(
        lambda: save(Image.fromarray(quadrants(400, 300)), "JPEG")[:700], "invalid_image"
    ),
    "truncated-png": Case(lambda: PHOTO()[:70], "invalid_image"),
    "png-named-jpg": Case(PHOTO, None, QUADRANTS, key="photo.jpg"),
    "jpeg-named-png": Case(
        lambda: save(Image.fromarray(quadrants()), "JPEG"), None, stored, key="photo.png"
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
    "one-by-one": Case(
        lambda: save(Image.new("RGB", (1, 1), "red"), "PNG"), None, lambda _: solid(1, 1, RED)
    ),
    "one-by-sixty": Case(
        lambda: save(Image.new("RGB", (1, 60), "red"), "PNG"), None, lambda _: solid(1, 60, RED)
    ),
    "one-by-five-hundred": Case(
        lambda: save(Image.new("RGB", (1, 500), "red"), "PNG"), "invalid_image"
    ),
    "zero-width": Case(lambda: bomb_png(0, 10), "invalid_image"),
    "sixteen-bit-grey": Case(sixteen_bit, None, lambda _: ramp_in_eight_bits()),
    # Pure colours survive a CMYK JPEG exactly; an inverted (Adobe) reading would not.
    "cmyk-jpeg": Case(
        lambda: save(Image.fromarray(quadrants()).convert("CMYK"), "JPEG"), None, QUADRANTS
    ),
    "palette-with-transparency": Case(palette_with_transparency, None, lambda _: red_on_white()),
    "grey-with-alpha": Case(
        lambda: save(Image.fromarray(quadrants()).convert("LA"), "PNG"),
        None,
        lambda _: grey(quadrants()),
    ),
    "float-tiff": Case(
        lambda: save(Image.fromarray(quadrants()).convert("F"), "TIFF"),
        None,
        truncated_grey,
    ),
    "animated-gif": Case(lambda: animated("GIF"), None, QUADRANTS),
    "animated-webp": Case(lambda: animated("WEBP"), None, stored),
    **{
        f"exif-orientation-{n}": Case(
            lambda n=n: with_orientation(n), None, lambda data, n=n: upright(stored(data), n)
        )
        for n in range(1, 9)
    },
    "corrupt-exif": Case(corrupt_exif, None, stored),
    "trailing-garbage": Case(lambda: PHOTO() + b"\x00garbage" * 100, None, QUADRANTS),
    "bmp": Case(lambda: save(Image.fromarray(quadrants()), "BMP"), None, QUADRANTS),
    "heif": Case(lambda: save(Image.fromarray(quadrants()), "HEIF", quality=90), None, stored),
    "avif": Case(lambda: save(Image.fromarray(quadrants()), "AVIF", quality=90), None, stored),
    "mpo": Case(
        lambda: save(
            Image.fromarray(quadrants()),
            "MPO",
            save_all=True,
            append_images=[Image.new("RGB", (48, 32))],
        ),
        None,
        stored,
    ),
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
    # All subject, so the output is the photo itself.
    "mask-of-the-wrong-size": Case(
        lambda: save(Image.new("L", (7, 300), 255), "PNG"), None, QUADRANTS, role="mask"
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


@dataclass(frozen=True)
class Outcome:
    record: dict[str, Any]
    looks: np.ndarray | None  # what the input shows, for a kind that must succeed
    reference: dict[str, Any] | None  # the job of a plain PNG of `looks`, for an input


@pytest.fixture(scope="module")
def outcomes(stack: Stack) -> dict[str, Outcome]:
    """Every kind, and a plain PNG of what each good input shows, submitted at once (they
    share batches) and run to a final state."""
    photo = stack.upload("hostile/photo.png", PHOTO())
    requests, looks = [], {}
    for name, case in CORPUS.items():
        data = case.make()
        hostile = stack.upload(f"hostile/{name}/{case.key}", data)
        request: dict[str, Any] = {"input": photo, **case.fields}
        if case.role == "input":
            request["input"] = hostile
        elif case.role == "background":
            request["background"] = hostile
        else:
            request["mask"] = hostile
        requests.append(request)
        if case.looks is not None:
            looks[name] = np.ascontiguousarray(case.looks(data))
    plain = {
        name: stack.upload(f"hostile/{name}/reference.png", save(Image.fromarray(rgb), "PNG"))
        for name, rgb in looks.items()
        if CORPUS[name].role == "input"
    }
    job_ids = stack.submit([*requests, *({"input": png} for png in plain.values())])
    records = stack.wait_final(job_ids, timeout=180)
    references = dict(zip(plain, job_ids[len(CORPUS) :], strict=True))
    return {
        name: Outcome(
            records[job_id],
            looks.get(name),
            records[references[name]] if name in references else None,
        )
        for name, job_id in zip(CORPUS, job_ids[: len(CORPUS)], strict=True)
    }


def pixels(stack: Stack, record: dict[str, Any]) -> np.ndarray:
    with Image.open(io.BytesIO(stack.storage.read(record["output"]))) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_every_accepted_format_has_a_kind_that_must_decode_correctly() -> None:
    decoded = {
        Image.open(io.BytesIO(case.make())).format
        for case in CORPUS.values()
        if case.code is None and case.role == "input"
    }
    assert decoded >= ACCEPTED_FORMATS


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_hostile_input_ends_with_its_code_or_a_correct_output(
    name: str, outcomes: dict[str, Outcome], stack: Stack
) -> None:
    case, outcome = CORPUS[name], outcomes[name]
    record = outcome.record
    if case.code is None:
        assert record["status"] == "succeeded", record["error"]
        assert outcome.looks is not None
        height, width = outcome.looks.shape[:2]
        assert record["input_size"] == [width, height]
        output = pixels(stack, record)
        if case.role == "mask":
            # A given mask of all subject: the photo comes back untouched.
            assert np.array_equal(output, outcome.looks)
        else:
            assert outcome.reference is not None
            assert outcome.reference["status"] == "succeeded", outcome.reference["error"]
            reference = pixels(stack, outcome.reference)
            assert (reference != 255).any(axis=2).mean() > 0.25  # pictures, not blank outputs
            assert np.abs(output - reference).max() <= BATCH_NOISE_LEVELS
    else:
        assert record["status"] == "failed"
        assert record["error"]["code"] == case.code, record["error"]
        message = record["error"]["message"]
        assert 5 <= len(message) < 500 and "Traceback" not in message
        assert not stack.storage.exists(record["output"])
    assert record["attempts"] == 1


def test_the_worker_survives_the_corpus_with_bounded_memory(
    outcomes: dict[str, Outcome], stack: Stack
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
