"""The reference (docs/reference.md), generated from the code so it cannot drift from it.

`python -m producer.reference` prints it; `python -m producer.reference --write` (`make docs`)
rewrites the file, and tests/test_reference.py fails while the file differs from the output.
Each section reads one source of truth: the click commands, the FastAPI routes, the JobRequest
model, the error classes and the Settings model. Where the code carries no description, the
comment block written just above a model field stands in for it; the output depends only on the
code, never on the environment, so it is the same on every machine.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from producer.errors import BackdropError, TransientError
from producer.request import JobRequest
from producer.settings import Settings

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
REGENERATE = "make docs (or: .venv/bin/python -m producer.reference --write)"
# Modules that define error classes of their own: imported so every code is listed.
ERROR_MODULES = ("producer.api", "producer.backfill", "producer.broker", "producer.cli")
MISSING = "—"
# Any 32 characters that are not a known placeholder: the app is only built, never served.
_REFERENCE_TOKEN = "reference-token-never-served-000"

HEADER = f"""\
# Backdrop reference

<!-- Generated from the code by `python -m producer.reference`; do not edit by hand.
     Regenerate with: {REGENERATE} -->

Generated from the code: the CLI from its click commands (`producer/cli.py`), the HTTP API from
the FastAPI routes (`producer.api`), the job fields from the `JobRequest` model
(`producer/request.py`), the error codes from the error classes (`producer/errors.py`) and the
configuration from the `Settings` model (`producer/settings.py`). A test
(`tests/test_reference.py`) fails when this file and the code disagree. The public surface is
specified in [SPEC.md](SPEC.md); the README's Configuration table is the short version.

- [CLI](#cli)
- [HTTP API](#http-api)
- [Job fields](#job-fields)
- [Error codes](#error-codes)
- [Configuration](#configuration)
"""


def cell(text: object) -> str:
    """`text` as one Markdown table cell: one line, pipes escaped."""
    flat = " ".join(str(text).split())
    return flat.replace("|", "\\|") if flat else MISSING


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    names = list(header)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


def code(text: object) -> str:
    return f"`{text}`"


# --- CLI ---------------------------------------------------------------------------------


def walk_commands(
    command: click.Command, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `command`, depth first, subcommands in name order."""
    yield path, command
    if isinstance(command, click.Group):
        context = click.Context(command, info_name=path[-1])
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None and not sub.hidden:
                yield from walk_commands(sub, (*path, name))


def number_range(kind: click.IntRange | click.FloatRange) -> str:
    bounds = [
        f"{'>' if kind.min_open else '≥'} {kind.min}" if kind.min is not None else "",
        f"{'<' if kind.max_open else '≤'} {kind.max}" if kind.max is not None else "",
    ]
    return ", ".join([kind.name.removesuffix(" range"), *filter(None, bounds)])


def param_type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return " | ".join(str(choice) for choice in kind.choices)
    if getattr(param, "is_flag", False):
        return "flag"
    if isinstance(kind, click.IntRange | click.FloatRange):
        return number_range(kind)
    return kind.name


def param_default(param: click.Parameter) -> str:
    # to_info_dict() turns click's "no default" sentinel into None.
    default = param.to_info_dict().get("default")
    if callable(default):
        return "computed at run time"
    if default in (None, False, ()) or getattr(param, "is_flag", False):
        return ""
    return code(default)


def command_section(path: tuple[str, ...], command: click.Command) -> list[str]:
    context = click.Context(command, info_name=" ".join(path))
    usage = " ".join([" ".join(path), *command.collect_usage_pieces(context)])
    lines = [f"### `{' '.join(path)}`", "", f"```\n{usage}\n```", ""]
    help_text = inspect.cleandoc(command.help or "") or "(no help text)"
    lines += [help_text.replace("\b\n", ""), ""]
    # The help option is listed once, in the preamble; click caches it with whichever names
    # the first context that asked for it had, so it is left out by its option, not its name.
    params = [p for p in command.get_params(context) if "--help" not in p.opts]
    if params:
        rows = [
            (
                code(", ".join(p.opts + p.secondary_opts))
                if isinstance(p, click.Option)
                else code(p.human_readable_name),
                param_type(p),
                param_default(p),
                getattr(p, "help", None) or ("argument" if isinstance(p, click.Argument) else ""),
            )
            for p in params
        ]
        lines += [*table(("parameter", "type", "default", "meaning"), rows), ""]
    return lines


def cli_section() -> list[str]:
    from producer.cli import cli

    lines = [
        "## CLI",
        "",
        "Every command takes `-h`/`--help`. Errors print `code: message` on stderr and exit 1.",
        "",
    ]
    for path, command in walk_commands(cli, ("backdrop",)):
        lines += command_section(path, command)
    return lines


# --- HTTP API ----------------------------------------------------------------------------


def reference_app() -> FastAPI:
    """The API as `backdrop api` builds it, over a throwaway data dir it never touches."""
    from producer.api import create_app
    from producer.services import Services

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir), api_tokens=[_REFERENCE_TOKEN], api_docs=False)
        return create_app(Services(settings))


def route_summary(route: APIRoute) -> str:
    if route.summary:
        return route.summary
    docstring = inspect.cleandoc(route.description or "")
    return " ".join(docstring.split("\n\n")[0].split()) or route.name.replace("_", " ")


def http_section() -> list[str]:
    from producer.api.app import routes as api_routes

    app = reference_app()
    operations = app.openapi()["paths"]
    rows = []
    routes = [r for r in api_routes(app) if isinstance(r, APIRoute)]
    for route in sorted(routes, key=lambda r: r.path):
        for method in sorted(route.methods or ()):
            operation = operations.get(route.path, {}).get(method.lower(), {})
            token = "bearer token" if operation.get("security") else "none"
            rows.append((f"{method} {code(route.path)}", token, route_summary(route)))
    return [
        "## HTTP API",
        "",
        'Errors are JSON `{"error": {"code": …, "message": …}}` with the status in '
        "[Error codes](#error-codes). `/openapi.json` has the full schemas.",
        "",
        *table(("route", "auth", "summary"), rows),
        "",
    ]


# --- Pydantic models: job fields and settings -----------------------------------------------


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The `#` comment block written directly above each field of `model`'s class body."""
    source_lines, _ = inspect.getsourcelines(model)
    source = textwrap.dedent("".join(source_lines))
    lines = source.splitlines()
    comments: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            block: list[str] = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                block.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            if block:
                comments[node.target.id] = " ".join(block)
    return comments


def schema_type(schema: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return " or ".join(schema_type(option, definitions) for option in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(code(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {schema_type(schema.get('items', {}), definitions)}"
    return str(kind)


def model_default(value: object) -> str:
    """A default as it is written in JSON or the environment: unset, not `None` or `""`."""
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, list):
        return code(",".join(map(str, value))) if value else "empty"
    return code(value)


def schema_limits(schema: dict[str, Any]) -> str:
    options = schema.get("anyOf", [schema])
    words = {
        "minimum": "≥",
        "exclusiveMinimum": ">",
        "maximum": "≤",
        "exclusiveMaximum": "<",
        "minLength": "length ≥",
        "maxLength": "length ≤",
        "maxItems": "items ≤",
    }
    return ", ".join(
        f"{word} {option[key]}"
        for option in options
        for key, word in words.items()
        if key in option
    )


def field_rows(model: type[BaseModel]) -> Iterator[tuple[str, str, str, str, str]]:
    """name, type, limits, default, description of each field, in declaration order."""
    schema = model.model_json_schema()
    definitions = schema.get("$defs", {})
    comments = field_comments(model)
    for name, field in model.model_fields.items():
        prop = schema["properties"][name]
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = model_default(field.default_factory())  # type: ignore[call-arg]
        else:
            default = model_default(prop.get("default", field.default))
        description = field.description or comments.get(name, "")
        yield name, schema_type(prop, definitions), schema_limits(prop), default, description


def job_fields_section() -> list[str]:
    rows = [(code(n), t, limits, d, text) for n, t, limits, d, text in field_rows(JobRequest)]
    return [
        "## Job fields",
        "",
        "The fields of a job request: the Python client's `submit(**fields)`, the JSON of "
        "`POST /v1/jobs` and (as `--flags`) `backdrop submit`. Unknown fields are refused.",
        "",
        *table(("field", "type", "limits", "default", "meaning"), rows),
        "",
    ]


def env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return alias if isinstance(alias, str) else (prefix + name).upper()


def configuration_section() -> list[str]:
    rows = [
        (code(env_name(name)), kind, limits, default, text)
        for name, kind, limits, default, text in field_rows(Settings)
    ]
    return [
        "## Configuration",
        "",
        "Read once per process from the environment (`producer/settings.py`). Lists are "
        "comma-separated. An empty database, broker or prefix setting means the embedded "
        "default under `BACKDROP_DATA_DIR`.",
        "",
        *table(("variable", "type", "limits", "default", "meaning"), rows),
        "",
    ]


# --- Error codes -------------------------------------------------------------------------


def error_classes() -> list[type[BackdropError]]:
    """One class per code (the most general one), whichever module defines it."""
    for module in ERROR_MODULES:
        importlib.import_module(module)
    found: dict[str, type[BackdropError]] = {}
    pending: list[type[BackdropError]] = [BackdropError]
    while pending:
        kind = pending.pop(0)
        found.setdefault(kind.code, kind)
        pending += sorted(kind.__subclasses__(), key=lambda k: (k.__module__, k.__qualname__))
    return [found[code] for code in sorted(found)]


def error_meaning(kind: type[BackdropError]) -> str:
    own = kind.__dict__.get("__doc__")
    return inspect.cleandoc(own).split("\n\n")[0] if own else ""


def errors_section() -> list[str]:
    from producer.api import status_for

    rows = [
        (
            code(kind.code),
            "transient (retried)" if issubclass(kind, TransientError) else "permanent",
            status_for(kind.__new__(kind)),
            error_meaning(kind),
            code(kind.__module__),
        )
        for kind in error_classes()
    ]
    return [
        "## Error codes",
        "",
        "A job's `error.code`, the HTTP error's `code` and the CLI's `code: message` come from "
        "these classes. Permanent errors fail a job at once; transient ones are retried with "
        "backoff and reported once the retries are spent.",
        "",
        *table(("code", "kind", "HTTP", "meaning", "defined in"), rows),
        "",
    ]


# --- The document ------------------------------------------------------------------------


def render() -> str:
    # Building the app logs its configuration; none of it belongs in the reference.
    logging.disable(logging.CRITICAL)
    try:
        sections = [
            cli_section(),
            http_section(),
            job_fields_section(),
            errors_section(),
            configuration_section(),
        ]
    finally:
        logging.disable(logging.NOTSET)
    body = "\n".join(line.rstrip() for section in sections for line in section)
    return f"{HEADER}\n{body.rstrip()}\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        REFERENCE_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {REFERENCE_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
