"""Image decoding and encoding: untrusted bytes in, upright 8-bit RGB out, and back to bytes.

Every input is hostile until proven otherwise, so all of Pillow's failure modes are turned
into the job error codes of producer.errors and the pixel budget is checked from the header,
before a single pixel is decoded.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass

import fpng
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from producer.errors import InputTooLarge, InvalidImage, InvalidRequest, UnsupportedFormat
from producer.formats import OutputFormat
from producer.settings import PngCompression, get_settings

logger = logging.getLogger(__name__)

# We enforce our own pixel budget from the header (see _open); Pillow's global bomb guard
# would otherwise refuse or warn on legitimate 100 MP photos with its own exception types.
Image.MAX_IMAGE_PIXELS = None

# HEIC/HEIF, what iPhones upload, through pillow-heif (libheif); Pillow reads AVIF itself.
register_heif_opener()

# MPO is what Pillow calls the JPEGs many phones and cameras write (a JPEG plus previews).
ACCEPTED_FORMATS: frozenset[str] = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF"}
)
_ACCEPTED_LIST = "JPEG, PNG, WebP, HEIC/HEIF, AVIF, TIFF, BMP, GIF"

# Wider than this is a strip, not a photo: segmentation and compositing would degenerate.
MAX_ASPECT_RATIO = 100

_ICC_COLOUR_SPACE = slice(16, 20)  # the data colour space signature in an ICC header
_WEBP_MAX_SIDE = 16383
# Chroma subsampling smears colour across the hard edges a cutout has; above this quality
# the caller asked for fidelity, so keep full chroma (4:4:4), else 4:2:0 for size.
_FULL_CHROMA_QUALITY = 90
# png_compression "small": zlib level 3 is within a few percent of level 6's size on photos
# at about half the time. "fast" is fpng: 1/10 to 1/25 of level 3's CPU for files 15-33%
# larger (bench/codecs.py). It writes 8-bit RGB/RGBA only, so greyscale masks stay on zlib,
# which on a mostly flat mask costs ~20 ms at 2 MP anyway.
_PNG_COMPRESS_LEVEL = 3
_PNG_SIGNATURE_AND_IHDR = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, data, CRC
# libavif's speed 8: a 2.5 MP photo in ~0.9 s of CPU against ~1.8 s at its default 6, for
# files ~12% larger (still a fourteenth of the PNG).
_AVIF_SPEED = 8
# libwebp's method trades speed for size; 4 is its default, 2 is ~2x faster, ~3% larger.
_WEBP_METHOD = 2


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous, EXIF orientation already applied
    icc_profile: bytes | None  # an RGB ICC profile to embed in the output, else None
    source_format: str  # Pillow format name, e.g. "JPEG", "PNG"


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int) -> DecodedImage:
    """Decode a photo into upright 8-bit RGB, refusing anything unsafe with a job error.

    Transparent pixels are flattened onto white: their RGB values are undefined (often black
    or garbage left by the editor), and white is what a viewer shows them on.
    """
    image = _open(data, max_pixels=max_pixels, max_bytes=max_bytes)
    source_format = image.format or "unknown"
    icc = image.info.get("icc_profile") or None
    image = _upright(image)
    rgb, icc = _to_rgb(image, icc)
    return DecodedImage(rgb=np.ascontiguousarray(rgb), icc_profile=icc, source_format=source_format)


def decode_mask(data: bytes, *, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Decode a mask into (H, W) uint8, 255 = foreground, upright like a photo would be.

    Any mode is accepted and reduced to its luminance: colour masks become their Rec.601 grey,
    16-bit masks are scaled (not clipped) to 8 bits, and an alpha channel is ignored, so an
    RGBA mask is read from its colours, not its transparency.
    """
    image = _upright(_open(data, max_pixels=max_pixels, max_bytes=max_bytes))
    return np.ascontiguousarray(_to_grey(image))


def encode_image(
    pixels: np.ndarray,
    fmt: str,
    *,
    quality: int = 92,
    icc_profile: bytes | None = None,
    png_compression: PngCompression | None = None,
) -> bytes:
    """Encode RGB (H, W, 3) or RGBA (H, W, 4) uint8 pixels as png, jpeg, webp or avif.

    RGBA is straight (not premultiplied) alpha. `png_compression` defaults to the process's
    BACKDROP_PNG_COMPRESSION setting.
    """
    try:
        pil_format = OutputFormat(fmt).encoder
    except ValueError:
        raise InvalidRequest(
            f"cannot encode format {fmt!r}; choose png, jpeg, webp or avif"
        ) from None
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3|4) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if pixels.shape[2] == 4 and pil_format == "JPEG":
        raise InvalidRequest("format 'jpeg' cannot hold a transparent background")
    height, width = pixels.shape[:2]
    if pil_format == "WEBP" and max(width, height) > _WEBP_MAX_SIDE:
        raise UnsupportedFormat(
            f"webp holds at most {_WEBP_MAX_SIDE} pixels a side; this image is {width}x{height}"
            " (choose png or jpeg)"
        )
    if pil_format == "PNG" and (png_compression or get_settings().png_compression) == "fast":
        return _fast_png(pixels, icc_profile)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGBA" if pixels.shape[2] == 4 else "RGB")
    options: dict[str, object] = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if pil_format == "PNG":
        options["compress_level"] = _PNG_COMPRESS_LEVEL
    elif pil_format == "JPEG":
        subsampling = 0 if quality >= _FULL_CHROMA_QUALITY else 2
        options.update(quality=quality, optimize=False, subsampling=subsampling)
    elif pil_format == "AVIF":
        options.update(quality=quality, speed=_AVIF_SPEED)
    else:
        options.update(quality=quality, method=_WEBP_METHOD)
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def encode_mask(alpha: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of an (H, W) uint8 alpha mask."""
    if alpha.dtype != np.uint8 or alpha.ndim != 2:
        raise ValueError(f"expected (H, W) uint8 alpha, got {alpha.shape} {alpha.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(alpha), "L").save(
        buffer, "PNG", compress_level=_PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def _fast_png(pixels: np.ndarray, icc_profile: bytes | None) -> bytes:
    """fpng's PNG, with the ICC profile (which fpng cannot write) spliced in after IHDR."""
    png: bytes = fpng.from_ndarray(np.ascontiguousarray(pixels))
    if not icc_profile:
        return png
    # The iCCP chunk: a profile name, a NUL, compression method 0 (zlib), the deflated profile.
    body = b"iCCP" + b"ICC Profile\0\0" + zlib.compress(icc_profile)
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:_PNG_SIGNATURE_AND_IHDR] + chunk + png[_PNG_SIGNATURE_AND_IHDR:]


def image_size(data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[int, int]:
    """(width, height) as stored, read from the header alone after the checks decoding makes
    first: what the memory budget needs to know before a single pixel is decoded."""
    return _identify(data, max_pixels=max_pixels, max_bytes=max_bytes).size


def _open(data: bytes, *, max_pixels: int, max_bytes: int) -> Image.Image:
    """Identify, check limits from the header, then decode the pixels (first frame only)."""
    image = _identify(data, max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        raise InvalidImage(f"corrupt or truncated {image.format} ({_describe(exc)})") from None
    return image


def _identify(data: bytes, *, max_pixels: int, max_bytes: int) -> Image.Image:
    """The image, opened lazily (header only), once its format and geometry pass the limits."""
    if not data:
        raise InvalidImage("empty file")
    if len(data) > max_bytes:
        raise InputTooLarge(f"file is {len(data)} bytes; the limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage(f"not an image; accepted formats are {_ACCEPTED_LIST}") from None
    except Exception as exc:  # Pillow's plugins raise anything on hostile headers
        raise InvalidImage(f"unreadable image header ({_describe(exc)})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedFormat(
            f"{image.format or 'this'} images are not supported; use {_ACCEPTED_LIST}"
        )
    _check_geometry(image.size, max_pixels)
    return image


def _check_geometry(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"image is {width}x{height}: more than {MAX_ASPECT_RATIO}:1 is not a photo"
        )


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block must not cost the user the job
        logger.warning("ignoring unreadable EXIF orientation: %s", _describe(exc))
        return image


def _to_rgb(image: Image.Image, icc: bytes | None) -> tuple[np.ndarray, bytes | None]:
    """8-bit RGB pixels and the ICC profile that still describes them (RGB profiles only)."""
    mode = image.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(image, icc), None
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        grey = _to_grey(image)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    if _has_alpha(image):
        rgba = np.asarray(_convert(image, "RGBA"))
        return _flatten_on_white(rgba), _rgb_profile(icc)
    rgb = np.asarray(image if mode == "RGB" else _convert(image, "RGB"))
    return rgb, _rgb_profile(icc)


def _to_grey(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Deep greys are scaled from their full 16-bit range, not clipped at 255 as Pillow does.
        wide = np.asarray(image).astype(np.float32)
        return (np.clip(wide, 0, 65535) * (255 / 65535) + 0.5).astype(np.uint8)
    if mode == "L":
        return np.asarray(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return np.asarray(_convert(_convert(image, "RGBA"), "RGB").convert("L"))
    return np.asarray(_convert(image, "L"))


def _convert(image: Image.Image, mode: str) -> Image.Image:
    try:
        return image.convert(mode)
    except Exception as exc:  # exotic modes (LAB, HSV, ...) Pillow cannot map
        raise InvalidImage(
            f"cannot convert {image.mode} pixels to {mode} ({_describe(exc)})"
        ) from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    rgb = rgba[:, :, :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image, icc: bytes | None) -> np.ndarray:
    """Use the embedded CMYK profile when there is one: the naive formula shifts colours."""
    if icc and icc[_ICC_COLOUR_SPACE] == b"CMYK":
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB")
            if converted is not None:
                return np.asarray(converted)
        except Exception as exc:  # a broken profile: fall back to the plain conversion
            logger.warning("ignoring unusable CMYK profile: %s", _describe(exc))
    return np.asarray(_convert(image, "RGB"))


def _rgb_profile(icc: bytes | None) -> bytes | None:
    """Only an RGB profile may travel with RGB pixels; grey or CMYK ones would mislabel them."""
    if icc and len(icc) >= 128 and icc[_ICC_COLOUR_SPACE] == b"RGB ":
        return icc
    return None


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is a non-empty (H, W, 3) uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
