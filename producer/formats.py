"""Output formats: each knows its file extension, content type and encoder, in one place.

The producer names outputs and serves them with these; the worker encodes with them. No
imaging library is imported here, so the producer install stays free of cv2 and torch.
"""

from __future__ import annotations

from enum import StrEnum

from producer.errors import UnsupportedFormat

# Spellings users type for a format, besides its value.
_ALIASES = {"jpg": "jpeg"}


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    AVIF = "avif"

    @classmethod
    def _missing_(cls, value: object) -> OutputFormat | None:
        # "JPG", "Png": what a file name or a user says is the format too.
        if isinstance(value, str):
            name = value.lower()
            name = _ALIASES.get(name, name)
            for member in cls:
                if member.value == name:
                    return member
        return None

    @classmethod
    def of(cls, value: str) -> OutputFormat:
        """The format a name (or alias, any case) means; unsupported_format otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise UnsupportedFormat(f"{value!r} is not an output format; {choices()}") from None

    @property
    def extension(self) -> str:
        """The file extension its outputs get, without the dot."""
        return "jpg" if self is OutputFormat.JPEG else self.value

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"

    @property
    def encoder(self) -> str:
        """Pillow's name for the format."""
        return self.value.upper()


# A saved mask is always a greyscale PNG.
MASK_FORMAT = OutputFormat.PNG


def choices() -> str:
    """The formats as a user names them in a file: `use .png, .jpg, .webp or .avif`."""
    names = [f".{f.extension}" for f in OutputFormat]
    return f"use {', '.join(names[:-1])} or {names[-1]}"
