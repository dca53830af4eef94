"""Thumbnails made from image bytes: what decodes, what comes out, and what is refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from producer.errors import InputTooLarge, InvalidImage
from producer.thumbnail import Thumbnails, make_thumbnail

LIMIT = 25_000_000


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_an_opaque_photo_becomes_a_small_jpeg_of_the_same_shape(
    photo_bytes: dict[str, bytes],
) -> None:
    thumbnail = make_thumbnail(photo_bytes["astronaut"], max_pixels=LIMIT)  # 512×512 PNG
    image = opened(thumbnail.data)
    assert thumbnail.media_type == "image/jpeg" and image.format == "JPEG"
    assert image.size == (320, 320)


def test_a_small_image_is_never_scaled_up() -> None:
    data = encoded(Image.new("RGB", (40, 30), "navy"), "WEBP")
    assert opened(make_thumbnail(data, max_pixels=LIMIT).data).size == (40, 30)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (100, 80), (10, 200, 30, 0)),
        Image.new("LA", (100, 80), (128, 0)),
        Image.new("P", (100, 80), 0),
    ],
    ids=["rgba", "grey-alpha", "palette-transparency"],
)
def test_any_kind_of_transparency_comes_out_as_a_transparent_png(image: Image.Image) -> None:
    options = {"transparency": 0} if image.mode == "P" else {}
    thumbnail = make_thumbnail(encoded(image, "PNG", **options), max_pixels=LIMIT)
    result = opened(thumbnail.data)
    assert thumbnail.media_type == "image/png" and result.mode == "RGBA"
    assert result.getpixel((50, 40))[3] == 0


def test_a_16_bit_grey_png_keeps_its_tones() -> None:
    data = encoded(Image.new("I;16", (64, 64), 32_768), "PNG")
    low, high = opened(make_thumbnail(data, max_pixels=LIMIT).data).convert("L").getextrema()
    assert 120 <= low <= high <= 136  # mid-grey, not clipped to white


def test_a_cmyk_jpeg_comes_out_as_rgb() -> None:
    data = encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
    result = opened(make_thumbnail(data, max_pixels=LIMIT).data)
    assert result.mode == "RGB"
    red, green, blue = result.getpixel((32, 32))
    assert red > 200 and green < 60 and blue < 60


def test_the_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded(Image.new("RGB", (200, 100), "white"), "JPEG", exif=exif)
    assert opened(make_thumbnail(data, max_pixels=LIMIT).data).size == (100, 200)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain text\n",
        b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        encoded(Image.new("RGB", (8, 8)), "GIF"),
        encoded(Image.new("RGB", (8, 8)), "BMP"),
        encoded(Image.new("RGB", (8, 8)), "TIFF"),
        encoded(Image.new("RGB", (64, 64)), "PNG")[:60],
    ],
    ids=["empty", "text", "svg", "gif", "bmp", "tiff", "truncated-png"],
)
def test_anything_but_a_whole_png_jpeg_or_webp_is_an_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        make_thumbnail(data, max_pixels=LIMIT)


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    data = encoded(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(InputTooLarge, match="3000×2000"):
        make_thumbnail(data, max_pixels=5_999_999)


def test_a_thumbnail_is_made_once_and_then_served_from_the_cache() -> None:
    reads: list[str] = []
    data = encoded(Image.new("RGB", (64, 64), "red"), "PNG")

    def read() -> bytes:
        reads.append("read")
        return data

    thumbnails = Thumbnails(LIMIT, cached=2)
    first = thumbnails.get("a", read)
    assert thumbnails.get("a", read) is first
    thumbnails.get("b", read)
    thumbnails.get("c", read)  # evicts "a", the least recently used
    thumbnails.get("a", read)
    assert len(reads) == 4
