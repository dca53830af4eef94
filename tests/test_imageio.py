"""Decoding untrusted bytes into upright RGB, every refusal with its code, and encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms
from pydantic import ValidationError

from producer import settings as settings_module
from producer.errors import InputTooLarge, InvalidImage, InvalidRequest, UnsupportedFormat
from producer.settings import Settings
from worker.imageio import decode_image, decode_mask, encode_image, encode_mask, image_size

LIMITS = {"max_pixels": 50_000_000, "max_bytes": 50_000_000}


def decode(data: bytes, **limits: int):
    return decode_image(data, **{**LIMITS, **limits})


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def quadrants(width: int = 40, height: int = 30) -> np.ndarray:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation visible."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 2] = (255, 0, 0)
    rgb[: height // 2, width // 2 :] = (0, 255, 0)
    rgb[height // 2 :, : width // 2] = (0, 0, 255)
    rgb[height // 2 :, width // 2 :] = (255, 255, 255)
    return rgb


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("PNG", "P", {}),
        ("JPEG", "RGB", {"quality": 95}),
        ("JPEG", "L", {"quality": 95}),
        ("WEBP", "RGB", {"lossless": True}),
        ("TIFF", "RGB", {}),
        ("BMP", "RGB", {}),
        ("GIF", "P", {}),
    ],
)
def test_each_accepted_format_round_trips_to_the_right_size_and_colours(fmt, mode, options):
    source = Image.fromarray(quadrants()).convert(mode)
    decoded = decode(save(source, fmt, **options))
    expected = np.asarray(source.convert("RGB"), dtype=np.int16)
    assert decoded.rgb.shape == (30, 40, 3)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.flags.c_contiguous
    assert np.abs(decoded.rgb[3:12, 3:15].astype(np.int16) - expected[3:12, 3:15]).max() <= 8
    assert decoded.source_format == fmt


def test_a_real_photo_decodes_with_its_rgb_icc_profile(photo_bytes):
    decoded = decode(photo_bytes["chelsea"])
    assert decoded.rgb.shape == (300, 451, 3)
    assert decoded.icc_profile is not None and decoded.icc_profile[16:20] == b"RGB "


def test_transparent_pixels_are_flattened_onto_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # opaque red
    rgba[:, 5:] = (0, 0, 0, 0)  # transparent "black"
    rgb = decode(save(Image.fromarray(rgba, "RGBA"), "PNG")).rgb
    assert (rgb[:, :5] == (255, 0, 0)).all()
    assert (rgb[:, 5:] == 255).all()


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_grey_and_palette_alpha_are_flattened_onto_white(mode):
    image = Image.fromarray(np.zeros((6, 6, 4), np.uint8), "RGBA").convert(mode)
    assert (decode(save(image, "PNG")).rgb == 255).all()


def test_palette_png_with_trns_is_flattened_onto_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    rgb = decode(save(image, "PNG", transparency=0)).rgb
    assert (rgb[:, :4] == (10, 200, 30)).all()
    assert (rgb[:, 4:] == 255).all()


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    image = Image.fromarray(ramp)
    rgb = decode(save(image, "PNG")).rgb
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert np.abs(rgb[:, :, 0].astype(int) - np.round(ramp / 257)).max() <= 1


def test_cmyk_jpeg_decodes_to_rgb_close_to_the_source_without_its_profile():
    source = quadrants()
    data = save(Image.fromarray(source).convert("CMYK"), "JPEG", quality=95)
    decoded = decode(data)
    assert decoded.rgb.shape == source.shape
    assert np.abs(decoded.rgb[3:12, 3:15].astype(int) - source[3:12, 3:15]).max() <= 8
    assert decoded.icc_profile is None


def test_a_cmyk_profile_is_never_attached_to_rgb_output():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    fake_cmyk = profile[:16] + b"CMYK" + profile[20:]  # unusable as CMYK: decode must cope
    data = save(Image.fromarray(quadrants()).convert("CMYK"), "JPEG", icc_profile=fake_cmyk)
    decoded = decode(data)
    assert decoded.icc_profile is None
    assert decoded.rgb.shape == (30, 40, 3)


def test_a_grey_jpegs_profile_is_dropped():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey = profile[:16] + b"GRAY" + profile[20:]
    image = Image.fromarray(quadrants()).convert("L")
    assert decode(save(image, "JPEG", icc_profile=grey)).icc_profile is None


def expected_upright(orientation: int, stored: np.ndarray) -> np.ndarray:
    # The stored pixels were made by applying the inverse of the display transform.
    transforms = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](stored)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    stored = quadrants(40, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    rgb = decode(data).rgb.astype(int)
    expected = expected_upright(orientation, stored).astype(int)
    assert rgb.shape == expected.shape
    for y, x in [(2, 2), (2, -3), (-3, 2), (-3, -3)]:  # each corner's colour
        assert np.abs(rgb[y, x] - expected[y, x]).max() <= 40


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_corrupt_exif_block_is_ignored_rather_than_fatal():
    valid = save(Image.fromarray(quadrants()), "JPEG", quality=95)
    garbage = b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff\xff\xff" + b"\xab" * 40
    segment = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    data = valid[:2] + segment + valid[2:]
    assert decode(data).rgb.shape == (30, 40, 3)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR declares a huge image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def valid_png() -> bytes:
    return save(Image.fromarray(quadrants()), "PNG")


def valid_jpeg() -> bytes:
    return save(Image.fromarray(quadrants(400, 300)), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (b"just some text, not a picture\n" * 5, InvalidImage),
        (b"<!DOCTYPE html><html><body>hi</body></html>", InvalidImage),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", InvalidImage),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40, InvalidImage),
        (valid_jpeg()[:600], InvalidImage),
        (valid_png()[:60], InvalidImage),
        (bomb_png(100_000, 100_000), InputTooLarge),
        (bomb_png(0, 10), InvalidImage),
        (bomb_png(10_000, 20), InvalidImage),
        (save(Image.new("RGB", (16, 16)), "ICO"), UnsupportedFormat),
        (save(Image.new("RGB", (16, 16)), "PPM"), UnsupportedFormat),
    ],
    ids=[
        "empty",
        "text",
        "html",
        "pdf",
        "zip",
        "truncated-jpeg",
        "truncated-png",
        "bomb-png",
        "zero-width",
        "absurd-aspect",
        "ico",
        "ppm",
    ],
)
def test_refused_inputs_get_their_error_code(data, error):
    with pytest.raises(error) as caught:
        decode(data)
    assert caught.value.message


def test_empty_file_says_so():
    with pytest.raises(InvalidImage, match="empty file"):
        decode(b"")


def test_text_is_called_not_an_image_with_the_accepted_formats_listed():
    with pytest.raises(InvalidImage, match=r"not an image.*JPEG, PNG, WebP"):
        decode(b"hello world, this is not an image at all")


def test_files_over_max_bytes_are_refused_before_decoding():
    with pytest.raises(InputTooLarge):
        decode(valid_png(), max_bytes=100)


def test_pixel_budget_is_checked_from_the_header():
    with pytest.raises(InputTooLarge, match="10000000000"):
        decode(bomb_png(100_000, 100_000), max_pixels=10**8)
    with pytest.raises(InputTooLarge):
        decode(valid_png(), max_pixels=40 * 30 - 1)


def test_the_size_comes_from_the_header_without_decoding_a_pixel():
    # The bomb's pixel data is 1 KB for 7,000 x 7,000: decoding it would fail as truncated.
    assert image_size(bomb_png(7000, 7000), **LIMITS) == (7000, 7000)
    with pytest.raises(InvalidImage):
        decode(bomb_png(7000, 7000))
    assert image_size(valid_jpeg(), **LIMITS) == (400, 300)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (b"just some text, not a picture\n", InvalidImage),
        (bomb_png(100_000, 100_000), InputTooLarge),
        (bomb_png(10_000, 20), InvalidImage),
        (save(Image.new("RGB", (16, 16)), "ICO"), UnsupportedFormat),
    ],
    ids=["empty", "text", "bomb-png", "absurd-aspect", "ico"],
)
def test_the_size_is_refused_as_decoding_would_refuse(data, error):
    with pytest.raises(error):
        image_size(data, **LIMITS)


def test_masks_decode_to_grey_and_scale_sixteen_bit():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    assert np.array_equal(decode_mask(save(Image.fromarray(mask), "PNG"), **LIMITS), mask)
    deep = Image.fromarray(mask.astype(np.uint16) * 257)
    assert np.array_equal(decode_mask(save(deep, "PNG"), **LIMITS), mask)
    rgba = Image.fromarray(np.dstack([mask, mask, mask, np.full_like(mask, 7)]), "RGBA")
    assert np.array_equal(decode_mask(save(rgba, "PNG"), **LIMITS), mask)


def test_mask_decoding_refuses_non_images_too():
    with pytest.raises(InvalidImage):
        decode_mask(b"not a mask", **LIMITS)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif"])
def test_encoded_rgb_decodes_back_to_the_same_size_and_colours(fmt):
    pixels = quadrants()
    data = encode_image(pixels, fmt, quality=95)
    back = decode(data)
    assert back.source_format == fmt.upper()
    assert np.abs(back.rgb[3:12, 3:15].astype(int) - pixels[3:12, 3:15]).max() <= 8


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_rgba_encodes_with_its_alpha(fmt):
    rgba = np.dstack([quadrants(), np.full((30, 40), 100, np.uint8)])
    image = Image.open(io.BytesIO(encode_image(rgba, fmt, quality=100)))
    assert image.mode == "RGBA"
    assert abs(int(np.asarray(image)[10, 10, 3]) - 100) <= 2


def test_rgba_cannot_be_encoded_as_jpeg():
    with pytest.raises(InvalidRequest):
        encode_image(np.zeros((4, 4, 4), np.uint8), "jpeg")


def test_the_icc_profile_is_embedded_when_given(photo_bytes):
    profile = decode(photo_bytes["chelsea"]).icc_profile
    for fmt in ("png", "jpeg", "webp"):
        data = encode_image(quadrants(), fmt, icc_profile=profile)
        assert Image.open(io.BytesIO(data)).info.get("icc_profile") == profile


def test_jpeg_quality_changes_the_file_size(photo_bytes):
    rgb = decode(photo_bytes["astronaut"]).rgb
    assert len(encode_image(rgb, "jpeg", quality=50)) < len(encode_image(rgb, "jpeg", quality=95))


def test_encode_mask_writes_an_8_bit_grey_png():
    alpha = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.open(io.BytesIO(encode_mask(alpha)))
    assert image.format == "PNG" and image.mode == "L"
    assert np.array_equal(np.asarray(image), alpha)


@pytest.mark.parametrize("compression", ["fast", "small"])
def test_png_output_is_lossless_for_a_real_photo(photo_bytes, compression):
    rgb = decode(photo_bytes["astronaut"]).rgb
    data = encode_image(rgb, "png", png_compression=compression)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), rgb)


@pytest.mark.parametrize("compression", ["fast", "small"])
def test_png_keeps_straight_alpha_and_the_colour_under_transparent_pixels(compression):
    rgba = np.dstack([quadrants(), np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))])
    image = Image.open(io.BytesIO(encode_image(rgba, "png", png_compression=compression)))
    assert image.mode == "RGBA"
    assert np.array_equal(np.asarray(image), rgba)  # alpha 0 columns keep their colours too


def test_fast_png_carries_the_icc_profile_in_a_valid_chunk(photo_bytes):
    photo = decode(photo_bytes["chelsea"])
    data = encode_image(photo.rgb, "png", icc_profile=photo.icc_profile, png_compression="fast")
    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC, the spliced iCCP's included
    image = Image.open(io.BytesIO(data))
    assert image.info["icc_profile"] == photo.icc_profile
    assert np.array_equal(np.asarray(image), photo.rgb)


def test_small_png_is_smaller_than_fast_and_is_zlib_level_3(photo_bytes):
    rgb = decode(photo_bytes["coffee"]).rgb
    fast = encode_image(rgb, "png", png_compression="fast")
    small = encode_image(rgb, "png", png_compression="small")
    assert len(small) < len(fast)
    assert small == save(Image.fromarray(rgb), "PNG", compress_level=3)


def test_png_compression_defaults_to_fast_and_reads_the_environment(monkeypatch):
    assert Settings().png_compression == "fast"
    monkeypatch.setenv("BACKDROP_PNG_COMPRESSION", "small")
    assert Settings().png_compression == "small"
    monkeypatch.setenv("BACKDROP_PNG_COMPRESSION", "tiny")
    with pytest.raises(ValidationError):
        Settings()


def test_png_encoding_follows_the_process_setting(monkeypatch, photo_bytes):
    rgb = decode(photo_bytes["coffee"]).rgb
    monkeypatch.setattr(settings_module, "_current", Settings(png_compression="small"))
    assert encode_image(rgb, "png") == encode_image(rgb, "png", png_compression="small")
    monkeypatch.setattr(settings_module, "_current", Settings(png_compression="fast"))
    assert encode_image(rgb, "png") == encode_image(rgb, "png", png_compression="fast")
