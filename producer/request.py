"""The job request: the same fields in the Python API, the CLI flags and the HTTP JSON."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from producer import callbacks, locations
from producer.errors import BackdropError, InvalidRequest
from producer.formats import OutputFormat
from producer.settings import get_settings

# Pascal VOC labels in the order of the DeepLabV3 output channels (index 0 is background).
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
FOREGROUND_CLASSES: tuple[str, ...] = VOC_CLASSES[1:]

# A `remove` background colour, #RRGGBB; the groups are its red, green and blue.
HEX_COLOUR = re.compile(r"#([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})")
MAX_CLASSES = 100
_CANVAS_SIZE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")
# A canvas side beyond this is no marketplace image, and its buffers would cost gigabytes.
MAX_CANVAS_SIDE = 8192


def _printable(value: str) -> str:
    character = locations.unsafe_character(value)
    if character is not None:
        raise ValueError(f"{character!r} is not allowed (no control characters or lone surrogates)")
    return value


def _canonical_location(value: str) -> str:
    try:
        return locations.canonical(value)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


# Strict: a JSON string is never taken for a number or a boolean, nor `true` for a number.
# A float field still takes an integer (1 is a fine blur_strength).
Text = Annotated[str, Strict(), AfterValidator(_printable)]
# Every location is stored and compared in its one canonical spelling (see locations.py),
# so an alias (`./`, `//`, `%69`, a symlink) of an input is the input, and two jobs cannot
# own one output under two names.
Location = Annotated[
    str,
    Strict(),
    Field(max_length=locations.MAX_LOCATION_LENGTH),
    AfterValidator(_printable),
    AfterValidator(_canonical_location),
]
UnitFloat = Annotated[float, Strict(), Field(gt=0, le=1)]


class Effect(StrEnum):
    REMOVE = "remove"
    REPLACE = "replace"
    BLUR = "blur"
    DESATURATE = "desaturate"


class Crop(StrEnum):
    NONE = "none"
    SUBJECT = "subject"


class Queue(StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class JobRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_enum_values=True, validate_default=True
    )

    input: Location
    effect: Effect = Effect.REMOVE
    # A colour for `remove`, a location for `replace` (canonicalised once the effect is known).
    background: Annotated[Text, Field(max_length=locations.MAX_LOCATION_LENGTH)] | None = None
    blur_strength: UnitFloat = 0.5
    classes: Annotated[list[Text], Strict(), Field(max_length=MAX_CLASSES)] | None = None
    output: Location | None = None
    format: OutputFormat = OutputFormat.PNG
    mask_output: Location | None = None
    mask: Location | None = None
    idempotency_key: Annotated[Text, Field(min_length=1, max_length=200)] | None = None
    queue: Queue = Queue.INTERACTIVE
    # A photo with none of the classes fails no_subject rather than becoming a blank output
    # (most products are no VOC class); false keeps the all-background result.
    fail_on_no_subject: StrictBool = True
    jpeg_quality: Annotated[StrictInt, Field(ge=1, le=100)] = 92
    # Outputs never replace an object this job did not write (output_exists) unless asked.
    overwrite: StrictBool = False
    callback_url: Annotated[Text, Field(max_length=callbacks.MAX_URL_LENGTH)] | None = None
    crop: Crop = Crop.NONE
    margin: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.05
    size: Annotated[str, Strict()] | None = None

    @field_validator("size")
    @classmethod
    def _canvas_size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _CANVAS_SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"expected WxH in pixels, e.g. 1000x1000, got {value[:40]!r}")
        width, height = int(match[1]), int(match[2])
        if not (1 <= width <= MAX_CANVAS_SIDE and 1 <= height <= MAX_CANVAS_SIDE):
            raise ValueError(f"each side must be 1 to {MAX_CANVAS_SIDE} pixels, got {value!r}")
        return f"{width}x{height}"

    @field_validator("callback_url")
    @classmethod
    def _callable_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                callbacks.check_url(value, get_settings())
            except callbacks.Refused as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = [name.strip().lower() for name in value if name.strip()]
        unknown = sorted(set(names) - set(FOREGROUND_CLASSES))
        if unknown:
            raise ValueError(
                f"unknown classes {unknown}; choose from {', '.join(FOREGROUND_CLASSES)}"
            )
        if not names:
            raise ValueError("classes must name at least one class")
        return sorted(set(names), key=FOREGROUND_CLASSES.index)

    @model_validator(mode="after")
    def _background_fits_effect(self) -> JobRequest:
        if self.effect == Effect.REPLACE:
            if self.background is None:
                raise ValueError("effect 'replace' needs background: the location of an image")
            try:
                background = locations.canonical(self.background)
            except InvalidRequest as exc:
                raise ValueError(f"background: {exc.message}") from None
            object.__setattr__(self, "background", background)
        elif self.effect == Effect.REMOVE:
            background = self.background or "#FFFFFF"
            if background != "transparent" and not HEX_COLOUR.fullmatch(background):
                raise ValueError("background for 'remove' must be #RRGGBB or 'transparent'")
            if background == "transparent" and self.format == OutputFormat.JPEG:
                raise ValueError("format 'jpeg' cannot hold a transparent background")
            normalised = background.upper() if background.startswith("#") else background
            object.__setattr__(self, "background", normalised)
        elif self.background is not None:
            raise ValueError(f"effect {self.effect!r} takes no background")
        sources = {self.input, self.mask}
        if self.effect == Effect.REPLACE:
            sources.add(self.background)
        if self.output is not None and self.output in sources:
            raise ValueError("output must not overwrite the input (nor the mask or background)")
        if self.mask_output is not None and self.mask_output in sources | {self.output}:
            raise ValueError("mask_output must not overwrite an input or the output")
        if "margin" in self.model_fields_set and self.crop != Crop.SUBJECT:
            raise ValueError("margin applies only with crop 'subject'")
        return self

    @property
    def transparent(self) -> bool:
        return self.effect == Effect.REMOVE and self.background == "transparent"

    @property
    def canvas(self) -> tuple[int, int] | None:
        """`size` as (width, height)."""
        if self.size is None:
            return None
        width, height = self.size.split("x")
        return int(width), int(height)

    @property
    def class_indices(self) -> list[int]:
        names = self.classes or list(FOREGROUND_CLASSES)
        return [VOC_CLASSES.index(name) for name in names]

    def params(self) -> dict[str, Any]:
        """What shapes the output besides input and effect: stored with the job record."""
        # callback_url has a column of its own: it is where the job reports, not how it runs.
        per_job = {
            "input",
            "output",
            "mask_output",
            "effect",
            "idempotency_key",
            "queue",
            "callback_url",
        }
        # Left out unless set, so the params (and backfill fingerprints) of every request
        # made before the flag existed stay what they were.
        if not self.overwrite:
            per_job.add("overwrite")
        if self.crop == Crop.NONE:
            per_job.update({"crop", "margin"})
        if self.size is None:
            per_job.add("size")
        return self.model_dump(mode="json", exclude=per_job)


def parse_request(data: dict[str, Any]) -> JobRequest:
    """Validate a request dict, turning pydantic's error into our InvalidRequest (or the
    AccessDenied of a location that tries `..`)."""
    try:
        return JobRequest.model_validate(data)
    except BackdropError:
        raise
    except ValidationError as exc:
        # pydantic prefixes our validators' messages with "Value error, ": not for users.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise InvalidRequest(problems) from None
