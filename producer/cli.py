"""`backdrop`: the command line. Worker-side commands import the worker lazily, so the
producer install (no torch) runs every other command."""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from producer.errors import BackdropError, InvalidRequest
from producer.request import FOREGROUND_CLASSES, Effect, OutputFormat, Queue
from producer.settings import configure, get_settings

EXIT_FAILED = 1
JOB_FIELDS = (
    "effect",
    "background",
    "blur_strength",
    "classes",
    "output",
    "format",
    "mask_output",
    "mask",
    "idempotency_key",
    "queue",
    "fail_on_no_subject",
    "overwrite",
)


def _fail(code: str, message: str) -> None:
    click.echo(f"{code}: {message}", err=True)
    sys.exit(EXIT_FAILED)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into the one-line `code: message` on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BackdropError as exc:
            _fail(exc.code, exc.message)
        except TimeoutError as exc:
            _fail("timeout", str(exc))

    return wrapper


def _classes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",")] if value else None


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--effect", type=click.Choice([e.value for e in Effect]), default="remove"),
        click.option("--background", help="remove: #RRGGBB or 'transparent'; replace: image"),
        click.option("--blur-strength", type=click.FloatRange(0, 1, min_open=True)),
        click.option(
            "--classes",
            callback=_classes,
            help=f"comma-separated VOC classes kept as subject ({','.join(FOREGROUND_CLASSES)})",
        ),
        click.option("--output"),
        click.option("--format", "format_", type=click.Choice([f.value for f in OutputFormat])),
        click.option("--mask-output"),
        click.option("--mask"),
        click.option("--idempotency-key"),
        click.option("--queue", type=click.Choice([q.value for q in Queue])),
        click.option("--fail-on-no-subject", is_flag=True, default=None),
        click.option(
            "--overwrite",
            is_flag=True,
            default=None,
            help="let the output replace an existing object this job did not write",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def request_fields(**options: Any) -> dict[str, Any]:
    options["format"] = options.pop("format_", None)
    return {k: v for k, v in options.items() if k in JOB_FIELDS and v is not None}


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def cli() -> None:
    """Backdrop: remove, replace, blur or desaturate photo backgrounds at scale."""
    from producer.logs import configure as configure_logging

    configure_logging("WARNING")


@cli.command()
@click.argument("input_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output_file", type=click.Path(dir_okay=False, path_type=Path))
@job_options
@click.option("--save-mask", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--model")
@reports_errors
def process(
    input_file: Path,
    output_file: Path,
    save_mask: Path | None,
    device: str | None,
    model: str | None,
    **options: Any,
) -> None:
    """Process one local file, without queue or database: the workers' code path."""
    settings = configure(device=device, model=model)
    fields = request_fields(**options)
    fields.setdefault("format", _format_from_suffix(output_file))
    mask_file = fields.pop("mask", None)
    from worker.local import process_file

    process_file(
        input_file,
        output_file,
        fields,
        settings=settings,
        mask_file=Path(mask_file) if mask_file else None,
        save_mask=save_mask,
    )
    click.echo(str(output_file))


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}.get(suffix, "png")


@cli.command()
@click.argument("input_location")
@job_options
@click.option("--wait", is_flag=True, help="wait until the job is final")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def submit(input_location: str, wait: bool, timeout: float, as_json: bool, **options: Any) -> None:
    """Queue a job; a plain local path is uploaded to the input prefix first."""
    from producer.client import Client

    client = Client()
    fields = request_fields(**options)
    fields["input"] = _as_location(client, input_location)
    for key in ("background", "mask"):
        if fields.get(key) and not fields[key].startswith("#") and fields[key] != "transparent":
            fields[key] = _as_location(client, fields[key])
    record = client.submit(fields)
    if wait:
        (record,) = client.wait([record["id"]], timeout=timeout)
    if as_json:
        _print_json(record)
    else:
        click.echo(record["id"] if not wait else f"{record['id']} {record['status']}")
    if wait and record["status"] != "succeeded":
        error = record["error"] or {"code": record["status"], "message": "job did not succeed"}
        _fail(error["code"], error["message"])


def _as_location(client: Any, value: str) -> str:
    if "://" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise InvalidRequest(f"{value} is neither a location (s3://, file://) nor a local file")
    from producer.storage import join

    location = join(client.settings.input_prefix, f"{uuid.uuid4().hex}-{path.name}")
    client.storage.upload_file(path, location)
    return location


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def status(job_id: str, as_json: bool) -> None:
    """Show one job."""
    from producer.client import Client

    record = Client().get(job_id)
    if as_json:
        _print_json(record)
        return
    for key, value in record.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        click.echo(f"{key:20} {shown}")


@cli.command(name="jobs")
@click.option("--status", "status_filter")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def jobs_command(status_filter: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs, newest first."""
    from producer.client import Client

    records, _ = Client().list(status=status_filter, limit=limit)
    if as_json:
        _print_json(records)
        return
    click.echo(format_table(records))


def format_table(records: list[dict[str, Any]]) -> str:
    header = f"{'id':36}  {'status':9}  {'effect':10}  {'ms':>7}  {'error':24}  input"
    lines = [header, "-" * len(header)]
    for r in records:
        total = sum((r["timings_ms"] or {}).values())
        error = (r["error"] or {}).get("code", "")
        lines.append(
            f"{r['id']:36}  {r['status']:9}  {r['effect']:10}  {total:7.0f}  {error:24}  "
            + r["input"]
        )
    return "\n".join(lines)


@cli.command()
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="retry every failed job")
@click.option(
    "--overwrite", is_flag=True, help="after output_exists: let the output replace the object"
)
@reports_errors
def retry(job_id: str | None, all_failed: bool, overwrite: bool) -> None:
    """Requeue a failed job (or all of them)."""
    from producer.client import Client

    if bool(job_id) == all_failed:
        raise InvalidRequest("give a JOB_ID or --failed, not both")
    if overwrite and all_failed:
        raise InvalidRequest("--overwrite is for one JOB_ID: it lets that job replace objects")
    client = Client()
    if all_failed:
        records = client.retry_failed()
    else:
        records = [client.retry(job_id or "", overwrite=overwrite)]
    for record in records:
        click.echo(f"{record['id']} {record['status']}")


@cli.command()
@click.argument("job_id")
@reports_errors
def cancel(job_id: str) -> None:
    """Cancel a queued job."""
    from producer.client import Client

    record = Client().cancel(job_id)
    click.echo(f"{record['id']} {record['status']}")


@cli.command()
@click.argument("source", required=False)
@click.option("--output-prefix", help="where outputs go: <prefix>/<key under SOURCE>.<ext>")
@job_options
@click.option("--dry-run", is_flag=True, help="count what would be skipped and submitted")
@click.option("--resume", "resume_id", metavar="ID", help="continue a killed or paused backfill")
@click.option("--pause", "pause_id", metavar="ID", help="stop submitting; --resume continues")
@click.option("--cancel", "cancel_id", metavar="ID", help="stop and cancel its queued jobs")
@click.option("--max-in-flight", type=click.IntRange(1), help="[default: 1000]")
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def backfill(
    source: str | None,
    output_prefix: str | None,
    dry_run: bool,
    resume_id: str | None,
    pause_id: str | None,
    cancel_id: str | None,
    max_in_flight: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Process every photo under an S3/file prefix or in a manifest CSV (bucket,key lines)
    through the bulk queue; prints the backfill record when it ends."""
    from producer.backfill import from_settings
    from producer.progress import ProgressLine

    engine = from_settings(get_settings())
    if pause_id or cancel_id:
        record = engine.pause(pause_id) if pause_id else engine.cancel(cancel_id or "")
        click.echo(f"{record['id']} {record['status']}")
        return
    fields = request_fields(**options)
    if dry_run:
        if not source or not output_prefix:
            raise InvalidRequest("--dry-run needs SOURCE and --output-prefix")
        counts = engine.dry_run(source, output_prefix, fields)
        click.echo(
            json.dumps(counts) if as_json else " · ".join(f"{k} {v}" for k, v in counts.items())
        )
        return
    if resume_id is None:
        if not source or not output_prefix:
            raise InvalidRequest("give SOURCE and --output-prefix (or --resume ID)")
        resume_id = engine.create(source, output_prefix, fields, max_in_flight)["id"]
    click.echo(f"backfill {resume_id}", err=True)
    progress = ProgressLine(sys.stderr)
    try:
        record = engine.run(resume_id, progress)
    finally:
        progress.close()
    if as_json:
        _print_json(record)
    else:
        click.echo(f"{record['id']} {record['status']} report={record['report'] or '-'}")
    if record["status"] == "canceled":
        _fail("canceled", f"backfill {record['id']} was canceled")


@cli.command()
@click.option("--queues", default="interactive,bulk", show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 512), help="job threads (default 2×batch)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--max-batch", type=click.IntRange(1, 256))
@click.option("--loglevel", default="INFO", show_default=True)
@reports_errors
def worker(
    queues: str, concurrency: int | None, device: str | None, max_batch: int | None, loglevel: str
) -> None:
    """Run a Celery worker: job threads feeding one batched model."""
    settings = configure(device=device, max_batch=max_batch)
    from worker.runner import run_worker

    run_worker(settings, queues=queues.split(","), concurrency=concurrency, loglevel=loglevel)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def stats(as_json: bool) -> None:
    """Job counts, throughput, latency percentiles, failures, queue depth and workers."""
    from producer.stats import collect, format_stats

    result = collect(get_settings())
    click.echo(json.dumps(result, indent=2) if as_json else format_stats(result))


@cli.command()
@click.option("--host", help="interface to listen on [default: BACKDROP_API_HOST or 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: BACKDROP_API_PORT or 8000]")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    default=None,
    help="serve without BACKDROP_API_TOKENS: anyone who reaches the port may use the API",
)
@reports_errors
def api(host: str | None, port: int | None, insecure_no_auth: bool | None) -> None:
    """Serve the HTTP API, /metrics and the dashboard (bearer-token auth)."""
    configure(api_insecure_no_auth=insecure_no_auth)
    from producer.api import serve
    from producer.logs import configure as configure_logging

    configure_logging("INFO")
    serve(host, port)


@cli.group()
def db() -> None:
    """Database schema."""


@db.command()
@reports_errors
def upgrade() -> None:
    """Apply every migration."""
    from producer.db import upgrade as upgrade_schema

    url = get_settings().database_url
    upgrade_schema(url)
    click.echo("database is at the newest schema")


@cli.group()
def models() -> None:
    """Model weights, for workers without internet access."""


@models.command(name="pull")
@click.option(
    "--model",
    "model_name",
    help="deeplabv3_resnet101 | deeplabv3_resnet50 | deeplabv3_mobilenet_v3_large "
    "[default: BACKDROP_MODEL]",
)
@click.option("--push", "push_to", help="upload below this prefix, e.g. s3://models/backdrop")
@reports_errors
def models_pull(model_name: str | None, push_to: str | None) -> None:
    """Download and verify a model's torchvision weights; optionally push them to a bucket.

    Prints the BACKDROP_WEIGHTS value for workers (the pushed location, or the local file).
    Needs the worker install (torch): run it where the worker image or extra is installed.
    """
    settings = get_settings()
    from producer.storage import get_storage
    from worker.weights import pull

    pulled = pull(model_name or settings.model, push_to, upload=get_storage().upload_file)
    click.echo(f"{pulled.model}: {pulled.path} sha256:{pulled.sha256}", err=True)
    click.echo(f"BACKDROP_WEIGHTS={pulled.pushed_to or pulled.path}")


@cli.command()
@click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path), default="demo-output"
)
@reports_errors
def demo(output_dir: Path) -> None:
    """Run the whole flow locally: a real worker process over real photos, all effects."""
    from worker.demo import run_demo

    run_demo(get_settings(), output_dir, echo=click.echo)


def main() -> None:
    cli(prog_name="backdrop")


if __name__ == "__main__":
    main()
