"""Job requests: the SPEC's fields, defaults and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.errors import AccessDenied, InvalidRequest
from producer.request import FOREGROUND_CLASSES, parse_request


def test_defaults_follow_the_spec() -> None:
    request = parse_request({"input": "s3://bucket/photo.jpg"})
    assert request.effect == "remove" and request.background == "#FFFFFF"
    assert request.format == "png" and request.queue == "interactive"
    assert request.class_indices == list(range(1, 21))
    # SPEC "Change": a photo with none of the classes fails no_subject, never a blank product.
    assert request.fail_on_no_subject is True


def test_classes_are_validated_and_mapped_to_voc_indices() -> None:
    request = parse_request({"input": "s3://bkt/k", "classes": ["person", "car"]})
    assert request.classes == ["car", "person"]
    assert request.class_indices == [7, 15]
    assert len(FOREGROUND_CLASSES) == 20


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"input": "http://example.com/a.jpg"}, "input: .*use s3://bucket/key"),
        ({"input": "s3://bkt/k", "classes": ["unicorn"]}, "unknown classes"),
        ({"input": "s3://bkt/k", "effect": "replace"}, "needs background"),
        ({"input": "s3://bkt/k", "background": "red"}, "#RRGGBB"),
        ({"input": "s3://bkt/k", "background": "transparent", "format": "jpeg"}, "transparent"),
        ({"input": "s3://bkt/k", "effect": "blur", "blur_strength": 0}, "blur_strength"),
        ({"input": "s3://bkt/k", "effect": "blur", "background": "#000000"}, "takes no background"),
        ({"input": "s3://bkt/k", "output": "s3://bkt/k"}, "overwrite the input"),
        ({"input": "s3://bkt/k", "colour": "#000000"}, "colour"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_refused_with_a_readable_reason(fields: dict, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        parse_request(fields)


def test_params_hold_what_shapes_the_output_besides_input_and_effect() -> None:
    request = parse_request(
        {"input": "s3://bkt/k", "effect": "blur", "blur_strength": 0.25, "format": "jpg"}
    )
    assert request.params()["blur_strength"] == 0.25
    assert request.params()["format"] == "jpeg"
    assert "input" not in request.params()


# --- locations: one canonical spelling -------------------------------------------------


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "R"
    (folder / "x").mkdir(parents=True)
    (folder / "in.jpg").write_bytes(b"photo")
    return folder


@pytest.mark.parametrize("alias", ["./in.jpg", "/in.jpg", "%69n.jpg", "x/./../in.jpg"])
def test_an_alias_of_the_input_is_refused_as_output_and_mask_output(
    photo_dir: Path, alias: str
) -> None:
    photo = (photo_dir / "in.jpg").as_uri()
    spelled = f"{photo_dir.as_uri()}/{alias}"
    with pytest.raises((InvalidRequest, AccessDenied)):
        parse_request({"input": photo, "output": spelled})
    with pytest.raises((InvalidRequest, AccessDenied)):
        parse_request({"input": photo, "mask_output": spelled})


def test_a_mask_output_spelled_differently_from_the_output_is_still_the_output(
    photo_dir: Path,
) -> None:
    output = f"{photo_dir.as_uri()}/out.png"
    with pytest.raises(InvalidRequest, match="mask_output must not overwrite"):
        parse_request(
            {
                "input": (photo_dir / "in.jpg").as_uri(),
                "output": output,
                "mask_output": f"{photo_dir.as_uri()}//./out%2Epng",
            }
        )


def test_locations_are_stored_in_canonical_form(photo_dir: Path) -> None:
    (photo_dir / "link").symlink_to(photo_dir / "x", target_is_directory=True)
    request = parse_request(
        {
            "input": f"{photo_dir.as_uri()}//./%69n.jpg",
            "output": f"{photo_dir.as_uri()}/link/out%20one.png",
            "mask": f"{photo_dir.as_uri()}/x/./m.png",
        }
    )
    assert request.input == (photo_dir / "in.jpg").as_uri()
    assert request.output == (photo_dir / "x" / "out one.png").as_uri()
    assert request.mask == (photo_dir / "x" / "m.png").as_uri()


def test_s3_keys_are_literal_and_percent_is_an_ordinary_key_character() -> None:
    request = parse_request({"input": "s3://bkt/in.jpg", "output": "s3://bkt/%69n.jpg"})
    assert request.output == "s3://bkt/%69n.jpg"


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("photos/../in.jpg", AccessDenied),
        ("../other-bucket/in.jpg", AccessDenied),
        ("photos/./in.jpg", InvalidRequest),
        ("photos//in.jpg", InvalidRequest),
        ("/in.jpg", InvalidRequest),
        ("photos/", InvalidRequest),
    ],
)
def test_s3_keys_that_a_store_could_resolve_to_another_key_are_refused(
    key: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        parse_request({"input": f"s3://bkt/{key}"})


@pytest.mark.parametrize("bucket", ["b", "Photos", "my_bucket", "a..b", "-abc", "192.168.0.1"])
def test_bucket_names_follow_s3_rules(bucket: str) -> None:
    with pytest.raises(InvalidRequest, match="bad bucket name"):
        parse_request({"input": f"s3://{bucket}/k.jpg"})


def test_a_location_of_five_megabytes_is_refused_without_being_repeated() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"input": "file:///" + "a/" * 2_500_000})
    assert len(raised.value.message) < 300


@pytest.mark.parametrize(
    ("location", "complaint"),
    [
        ("s3://bkt/" + "k" * 1025, "longer than 1024 bytes"),
        ("s3://bkt/" + "é" * 513, "longer than 1024 bytes"),
        ("file:///" + "d/" * 2048 + "x.png", "longer than 4095 bytes"),
        ("file:///tmp/" + "n" * 256 + ".png", "longer than 255 bytes"),
    ],
)
def test_locations_over_the_store_limits_are_refused(location: str, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        parse_request({"input": location})


def test_an_s3_key_of_exactly_1024_bytes_is_accepted() -> None:
    assert parse_request({"input": "s3://bkt/" + "k" * 1024}).input.endswith("k" * 1024)


# --- strict types and control characters -----------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"background": "#FFFFFF\n"},
        {"jpeg_quality": "50"},
        {"jpeg_quality": True},
        {"jpeg_quality": 50.0},
        {"effect": "blur", "blur_strength": True},
        {"effect": "blur", "blur_strength": "0.5"},
        {"fail_on_no_subject": "yes"},
        {"fail_on_no_subject": 1},
        {"overwrite": "true"},
        {"classes": "person"},
        {"classes": [7]},
        {"idempotency_key": 42},
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(fields: dict) -> None:
    with pytest.raises(InvalidRequest):
        parse_request({"input": "s3://bkt/k", **fields})


def test_an_integer_blur_strength_is_a_number() -> None:
    assert parse_request({"input": "s3://bkt/k", "effect": "blur", "blur_strength": 1})


@pytest.mark.parametrize(
    "character", ["\n", "\r", "\x1b", "\x00", "\x7f", "\x85", "\u2028", "\ud800"]
)
@pytest.mark.parametrize(
    "field", ["input", "output", "mask", "mask_output", "idempotency_key", "classes", "background"]
)
def test_control_characters_are_refused_in_every_string_field(field: str, character: str) -> None:
    value = f"s3://bkt/a{character}b.png"
    fields: dict = {"input": "s3://bkt/in.png", field: value}
    if field == "idempotency_key":
        fields[field] = f"key{character}"
    elif field == "classes":
        fields[field] = [f"person{character}"]
    elif field == "background":
        fields.update(effect="replace")
    # pydantic itself refuses a lone surrogate in a length-bounded string
    with pytest.raises(InvalidRequest, match=r"control character|unicode string"):
        parse_request(fields)


def test_a_percent_encoded_control_character_in_a_file_location_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="control character"):
        parse_request({"input": "file:///tmp/a%0Aforged.png"})


def test_overwrite_is_kept_in_params_only_when_set() -> None:
    assert "overwrite" not in parse_request({"input": "s3://bkt/k"}).params()
    assert parse_request({"input": "s3://bkt/k", "overwrite": True}).params()["overwrite"]
