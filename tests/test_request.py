"""Job requests: the SPEC's fields, defaults and refusals."""

from __future__ import annotations

import pytest

from producer.errors import InvalidRequest
from producer.request import FOREGROUND_CLASSES, parse_request


def test_defaults_follow_the_spec() -> None:
    request = parse_request({"input": "s3://bucket/photo.jpg"})
    assert request.effect == "remove" and request.background == "#FFFFFF"
    assert request.format == "png" and request.queue == "interactive"
    assert request.class_indices == list(range(1, 21))


def test_classes_are_validated_and_mapped_to_voc_indices() -> None:
    request = parse_request({"input": "s3://b/k", "classes": ["person", "car"]})
    assert request.classes == ["car", "person"]
    assert request.class_indices == [7, 15]
    assert len(FOREGROUND_CLASSES) == 20


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"input": "http://example.com/a.jpg"}, "input must be s3://"),
        ({"input": "s3://b/k", "classes": ["unicorn"]}, "unknown classes"),
        ({"input": "s3://b/k", "effect": "replace"}, "needs background"),
        ({"input": "s3://b/k", "background": "red"}, "#RRGGBB"),
        ({"input": "s3://b/k", "background": "transparent", "format": "jpeg"}, "transparent"),
        ({"input": "s3://b/k", "effect": "blur", "blur_strength": 0}, "blur_strength"),
        ({"input": "s3://b/k", "effect": "blur", "background": "#000000"}, "takes no background"),
        ({"input": "s3://b/k", "output": "s3://b/k"}, "overwrite the input"),
        ({"input": "s3://b/k", "colour": "#000000"}, "colour"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_refused_with_a_readable_reason(fields: dict, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        parse_request(fields)


def test_params_hold_what_shapes_the_output_besides_input_and_effect() -> None:
    request = parse_request(
        {"input": "s3://b/k", "effect": "blur", "blur_strength": 0.25, "format": "jpg"}
    )
    assert request.params()["blur_strength"] == 0.25
    assert request.params()["format"] == "jpeg"
    assert "input" not in request.params()
