"""Dashboard thumbnails: a stored image decoded with Pillow and re-encoded small.

Never the stored bytes themselves: an object that is not a PNG, JPEG or WebP image (a text
file a job failed on, an HTML page) gets no thumbnail at all, so the API cannot be made to
serve arbitrary content from the store under its own origin. Decoding is bounded: only those
three decoders, JPEGs decoded at reduced scale (up to 1/8), a cap on decoded pixels, and at
most DECODE_SLOTS reads and decodes at a time.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from PIL import Image, ImageOps

from producer.errors import InputTooLarge, InvalidImage

SIDE = 320
FORMATS = ("PNG", "JPEG", "WEBP", "AVIF")
DECODE_SLOTS = 2
CACHED = 64
JPEG_QUALITY = 85


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str


def make_thumbnail(data: bytes, *, max_pixels: int, side: int = SIDE) -> Thumbnail:
    """At most side×side, aspect kept: PNG where the image has alpha, JPEG otherwise.
    InvalidImage for anything but a decodable PNG, JPEG or WebP; InputTooLarge past
    `max_pixels` decoded pixels."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(f"image too large for a thumbnail: {exc}") from None
    except Exception:  # every decoder failure means the same thing: not an image we serve
        raise InvalidImage("not a PNG, JPEG or WebP image") from None
    with image:
        # JPEG only (a no-op for the others): decode at the smallest scale still >= 2×side.
        image.draft(None, (2 * side, 2 * side))
        width, height = image.size
        if width * height > max_pixels:
            raise InputTooLarge(
                f"a {width}×{height} image is over the thumbnail limit of {max_pixels} pixels"
            )
        try:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            small = _displayable(ImageOps.exif_transpose(image))
        except Exception:  # a truncated or corrupt body fails here, past the header
            raise InvalidImage("the image data is corrupt or truncated") from None
    buffer = io.BytesIO()
    if small.mode == "RGBA":
        small.save(buffer, "PNG", optimize=False)
        return Thumbnail(buffer.getvalue(), "image/png")
    small.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return Thumbnail(buffer.getvalue(), "image/jpeg")


def _displayable(image: Image.Image) -> Image.Image:
    """RGBA when the image has any transparency (a cut-out must stay one), else RGB."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B"):
        # 16-bit grey: converting straight to 8 bits would clip everything to white.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


class Thumbnails:
    """make_thumbnail behind a small LRU cache and a bound on concurrent decodes."""

    def __init__(self, max_pixels: int, *, side: int = SIDE, cached: int = CACHED) -> None:
        self._max_pixels = max_pixels
        self._side = side
        self._cached = cached
        self._cache: OrderedDict[Hashable, Thumbnail] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(DECODE_SLOTS)

    def get(self, key: Hashable, read: Callable[[], bytes]) -> Thumbnail:
        """The thumbnail cached under `key`, else made from `read()` and cached."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Reads too: each holds up to api_thumbnail_max_bytes in memory.
        with self._slots:
            thumbnail = make_thumbnail(read(), max_pixels=self._max_pixels, side=self._side)
        with self._lock:
            self._cache[key] = thumbnail
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        return thumbnail
