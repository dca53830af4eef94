"""The job request: the same fields in the Python API, the CLI flags and the HTTP JSON."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.errors import InvalidRequest

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

_HEX_COLOUR = re.compile(r"^#[0-9A-Fa-f]{6}$")
_LOCATION = re.compile(r"^(s3://[^/]+/.+|file:///.+)$")


class Effect(StrEnum):
    REMOVE = "remove"
    REPLACE = "replace"
    BLUR = "blur"
    DESATURATE = "desaturate"


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Queue(StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


def _check_location(value: str | None, field: str) -> str | None:
    if value is not None and not _LOCATION.match(value):
        raise ValueError(f"{field} must be s3://bucket/key or file:///absolute/path, got {value!r}")
    return value


class JobRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_enum_values=True, validate_default=True
    )

    input: str
    effect: Effect = Effect.REMOVE
    background: str | None = None
    blur_strength: float = Field(default=0.5, gt=0, le=1)
    classes: list[str] | None = None
    output: str | None = None
    format: OutputFormat = OutputFormat.PNG
    mask_output: str | None = None
    mask: str | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    queue: Queue = Queue.INTERACTIVE
    fail_on_no_subject: bool = False
    jpeg_quality: int = Field(default=92, ge=1, le=100)

    @field_validator("input", "output", "mask_output", "mask")
    @classmethod
    def _locations(cls, value: str | None, info: Any) -> str | None:
        return _check_location(value, info.field_name)

    @field_validator("format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: object) -> object:
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

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
            _check_location(self.background, "background")
        elif self.effect == Effect.REMOVE:
            background = self.background or "#FFFFFF"
            if background != "transparent" and not _HEX_COLOUR.match(background):
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
        return self

    @property
    def transparent(self) -> bool:
        return self.effect == Effect.REMOVE and self.background == "transparent"

    @property
    def class_indices(self) -> list[int]:
        names = self.classes or list(FOREGROUND_CLASSES)
        return [VOC_CLASSES.index(name) for name in names]

    def params(self) -> dict[str, Any]:
        """What shapes the output besides input and effect: stored with the job record."""
        return self.model_dump(
            mode="json",
            exclude={"input", "output", "mask_output", "effect", "idempotency_key", "queue"},
        )


def parse_request(data: dict[str, Any]) -> JobRequest:
    """Validate a request dict, turning pydantic's error into our InvalidRequest."""
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRequest(problems) from None
