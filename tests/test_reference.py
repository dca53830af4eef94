"""docs/reference.md is generated from the code and must stay equal to the generator's output."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from producer import reference
from producer.cli import cli
from producer.settings import Settings


@pytest.fixture(scope="module")
def rendered() -> str:
    return reference.render()


def test_the_committed_reference_is_what_the_code_generates(rendered: str) -> None:
    committed = reference.REFERENCE_PATH.read_text(encoding="utf-8")
    assert committed == rendered, (
        f"docs/reference.md is out of date with the code; regenerate it: {reference.REGENERATE}"
    )


def test_the_reference_does_not_depend_on_the_environment(
    rendered: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKDROP_API_DOCS", "true")
    monkeypatch.setenv("BACKDROP_MODEL", "deeplabv3_mobilenet_v3_large")
    monkeypatch.setenv("BACKDROP_MAX_BATCH", "2")
    assert reference.render() == rendered


def test_every_command_and_option_is_listed(rendered: str) -> None:
    for path, command in reference.walk_commands(cli, ("backdrop",)):
        assert f"### `{' '.join(path)}`" in rendered
        for param in command.params:
            if param.opts[0].startswith("-"):
                assert f"`{param.opts[0]}" in rendered


def test_every_route_is_listed(rendered: str) -> None:
    for route in reference.reference_app().routes:
        if isinstance(route, APIRoute):
            assert f"`{route.path}`" in rendered


def test_every_setting_and_error_code_is_listed(rendered: str) -> None:
    for name in Settings.model_fields:
        assert f"`{reference.env_name(name)}`" in rendered
    for kind in reference.error_classes():
        assert f"| `{kind.code}` |" in rendered


def test_a_table_cell_stays_on_one_line_and_escapes_pipes() -> None:
    assert reference.cell("a | b\n  c") == "a \\| b c"
    assert reference.cell("") == reference.MISSING
