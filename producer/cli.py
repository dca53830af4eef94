"""`backdrop`: the command line. Worker-side commands import the worker lazily, so the
producer install (no torch) runs every other command."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, get_args
from urllib.parse import unquote

import click
from pydantic import ValidationError

from producer.catalog import CLASS_AGNOSTIC, ModelName
from producer.errors import (
    AccessDenied,
    BackdropError,
    BackfillCanceled,
    BackfillPaused,
    BackgroundNotFound,
    DeviceUnavailable,
    InputNotFound,
    Interrupted,
    InvalidRequest,
    InvalidSettings,
    InvalidTransition,
    JobsFailed,
    PhotosFailed,
    WaitTimedOut,
)
from producer.formats import OutputFormat
from producer.jobtable import format_table
from producer.locations import FILE_SCHEME, real_path
from producer.models import JobStatus
from producer.outputs import STDIO, format_for, plan_outputs
from producer.request import FOREGROUND_CLASSES, Crop, Effect, JobRequest, Queue
from producer.settings import configure, get_settings

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# How long one round of `--wait` polls before it checks for a Ctrl-C Python dropped.
WAIT_ROUND_S = 2.0
# After this long still queued, `submit --wait` says whether any worker is there to take it.
NO_WORKER_WARNING_S = 5.0
# The job fields commands set, as flags of the same names (a test holds `submit` to them all).
JOB_FIELDS = tuple(name for name in JobRequest.model_fields if name != "input")
DEVICES = ("auto", "cpu", "cuda")
device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    help="where the model runs [default: BACKDROP_DEVICE or auto]",
)


def _fail(code: str, message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"{code}: {message}", err=True)
    sys.exit(exit_code)


def settings_problem(exc: ValidationError) -> str:
    """A settings error as the environment variables the user set: `BACKDROP_MODEL: …`."""
    return "; ".join(
        f"BACKDROP_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
        + (f" (got {error['input']!r})" if isinstance(error.get("input"), str | int) else "")
        for error in exc.errors()
    )


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into the one-line `code: message` on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BackdropError as exc:
            interrupted = isinstance(exc, Interrupted)
            _fail(exc.code, exc.message, EXIT_INTERRUPTED if interrupted else EXIT_FAILED)
        except ValidationError as exc:
            _fail(InvalidSettings.code, settings_problem(exc))
        except TimeoutError as exc:  # the client's wait
            _fail(WaitTimedOut.code, str(exc))

    return wrapper


def _classes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",")] if value else None


def _options(command: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


def effect_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What the result looks like: every command that makes one takes these."""
    return _options(
        command,
        [
            click.option(
                "--effect",
                type=click.Choice([e.value for e in Effect]),
                default="remove",
                help="what happens to the background",
            ),
            click.option(
                "--background",
                help="remove: #RRGGBB or 'transparent' [default: #FFFFFF]; "
                "replace: an image (file or location)",
            ),
            click.option(
                "--blur-strength",
                type=click.FloatRange(0, 1, min_open=True),
                help="blur: how strong, in (0, 1] [default: 0.5]",
            ),
            click.option(
                "--classes",
                callback=_classes,
                help=f"comma-separated VOC classes kept as subject [default: all: "
                f"{','.join(FOREGROUND_CLASSES)}]",
            ),
            click.option(
                "--format",
                "format_",
                type=click.Choice([f.value for f in OutputFormat]),
                help="output image format [default: from the output's extension, else png]",
            ),
            click.option(
                "--jpeg-quality",
                type=click.IntRange(1, 100),
                help="quality of a jpeg output, 1-100 [default: 92]",
            ),
            click.option(
                "--fail-on-no-subject/--no-fail-on-no-subject",
                default=None,
                help="fail with no_subject when the photo has none of the classes, "
                "rather than write an all-background image [default: fail]",
            ),
            click.option(
                "--crop",
                type=click.Choice([c.value for c in Crop]),
                help="subject: crop to the subject's box plus --margin [default: none]",
            ),
            click.option(
                "--margin",
                type=click.FloatRange(0, 1),
                help="with --crop subject: space around the subject, a share of the box's "
                "longer side [default: 0.05]",
            ),
            click.option(
                "--size",
                metavar="WxH",
                help="fit the result into a W×H canvas, centred, never upscaled, "
                "filled with the background",
            ),
        ],
    )


def overwrite_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--overwrite",
        is_flag=True,
        default=None,
        help="let the output replace an existing object this job did not write",
    )(command)


def request_fields(**options: Any) -> dict[str, Any]:
    options["format"] = options.pop("format_", None)
    return {k: v for k, v in options.items() if k in JOB_FIELDS and v is not None}


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _shown_location(location: str | None) -> str:
    """A file:// location as the path a user types; anything else as it is."""
    if location and location.startswith(FILE_SCHEME):
        return str(real_path(location))
    return location or "-"


@click.group(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="backdrop", prog_name="backdrop")
def cli() -> None:
    """Backdrop: remove, replace, blur or desaturate photo backgrounds at scale."""
    from producer.logs import configure as configure_logging

    configure_logging("WARNING")


def _check_device(device: str) -> None:
    from worker.segmenter import pick_device

    try:
        pick_device(device)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"{exc}; use --device cpu (or auto)") from None


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.argument("output", metavar="OUTPUT")
@effect_options
@click.option(
    "--mask",
    type=click.Path(dir_okay=False, path_type=Path),
    help="a coarse mask image to refine instead of running the model (one input only)",
)
@click.option(
    "--save-mask",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the final mask (PNG) here (one input only)",
)
@device_option
@click.option(
    "--model",
    type=click.Choice(list(get_args(ModelName))),
    help="segmentation model [default: BACKDROP_MODEL]",
)
@reports_errors
def process(
    inputs: tuple[str, ...],
    output: str,
    mask: Path | None,
    save_mask: Path | None,
    device: str | None,
    model: str | None,
    **options: Any,
) -> None:
    """Process local files without queue or database: the workers' code path, one model load.

    INPUT is a file, a folder (its photos, recursively) or '-' (stdin). One file in: OUTPUT
    is a file (its extension picks the format) or '-' (stdout). Several inputs or a folder:
    OUTPUT is a folder (created), names kept, extension from --format (default png).
    """
    settings = configure(device=device, model=model)
    fields = request_fields(**options)

    pairs = plan_outputs(inputs, output, fields.get("format"))
    if (mask or save_mask) and len(pairs) != 1:
        raise InvalidRequest("--mask and --save-mask take one input, not a folder or several")
    if mask is None:
        _check_device(settings.device)
    from worker.local import LocalProcessor

    processor = LocalProcessor(settings, fields)
    if len(pairs) == 1:
        processor.process(pairs[0], mask_file=mask, save_mask=save_mask)
        if pairs[0].output != STDIO:
            click.echo(pairs[0].output)
        return
    failed = 0
    with _progress_bar(pairs) as bar:
        for pair in bar:
            try:
                processor.process(pair)
            except BackdropError as exc:  # one bad photo never stops the others
                failed += 1
                click.echo(f"\n{pair.input}: {exc.code}: {exc.message}", err=True)
    click.echo(f"{len(pairs) - failed} of {len(pairs)} photos written to {output}")
    if failed:
        raise PhotosFailed(f"{failed} of {len(pairs)} photos failed (listed above)")


def _progress_bar(pairs: list[Any]) -> Any:
    """A bar on a terminal for several photos; nothing in a pipe or for one."""
    return click.progressbar(
        pairs,
        label="processing",
        file=sys.stderr,
        show_pos=True,
        item_show_func=lambda pair: pair.input if pair else None,
        hidden=len(pairs) < 2 or not sys.stderr.isatty(),
    )


@cli.command()
@click.argument("input_location", metavar="INPUT")
@effect_options
@click.option(
    "--output",
    help="a location, or a local path (relative to the cwd): written there, or fetched "
    "there once the job succeeds (implies --wait) [default: BACKDROP_OUTPUT_PREFIX/<id>.<ext>]",
)
@click.option("--mask-output", help="also write the final mask here (location or local path)")
@click.option("--mask", help="a coarse mask to refine instead of the model (file or location)")
@click.option("--idempotency-key", help="submitting the same key again returns the first job")
@click.option("--callback-url", help="https URL POSTed the signed job record when the job ends")
@click.option(
    "--queue",
    type=click.Choice([q.value for q in Queue]),
    help="interactive jobs go before bulk ones [default: interactive]",
)
@overwrite_option
@click.option("--wait", is_flag=True, help="wait until the job is final; print its output")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, help="seconds to wait")
@click.option("--json", "as_json", is_flag=True, help="print the job record as JSON")
@reports_errors
def submit(input_location: str, wait: bool, timeout: float, as_json: bool, **options: Any) -> None:
    """Queue a job; a plain local file is uploaded to the input prefix first (INPUT: a file
    or a location, s3://bucket/key or file:///path)."""
    from producer.client import Client

    client = Client()
    fields = request_fields(**options)
    fields["input"] = _as_location(client, input_location, "input")
    for key in ("background", "mask"):
        if fields.get(key) and not fields[key].startswith("#") and fields[key] != "transparent":
            fields[key] = _as_location(client, fields[key], key)
    fetch_to: dict[str, Path] = {}
    for key in ("output", "mask_output"):
        if fields.get(key) and "://" not in fields[key]:
            if key == "output":
                fields["format"] = format_for(fields[key], fields.get("format"))
            fields[key], fetched = _writable_location(client, key, Path(fields[key]))
            if fetched is not None:
                fetch_to[key] = fetched
    record = client.submit(fields)
    if not (wait or fetch_to):
        _print_json(record) if as_json else click.echo(record["id"])
        return
    record = _wait_for(client, record, timeout)
    if record["status"] == "succeeded":
        for key, path in fetch_to.items():
            _save(client, record[key], path)
            record[key + "_saved_to"] = str(path)
    if as_json:
        _print_json(record)
    else:
        saved = record.get("output_saved_to") or _shown_location(record["output"])
        click.echo(f"{record['id']} {record['status']} {saved}")
    if record["status"] != "succeeded":
        error = record["error"] or {"code": record["status"], "message": "job did not succeed"}
        _fail(error["code"], error["message"])


def _wait_for(client: Any, record: dict[str, Any], timeout: float) -> dict[str, Any]:
    job_id = record["id"]
    started = time.monotonic()
    try:
        with _ctrl_c_noted() as noted:
            click.echo(f"{job_id} {record['status']}: waiting (Ctrl-C stops waiting)", err=True)
            try:
                return _wait_one(client, job_id, min(timeout, NO_WORKER_WARNING_S), noted)
            except TimeoutError:
                if client.get(job_id)["status"] == "queued":
                    click.echo(f"warning: {_no_worker_hint(client, record['queue'])}", err=True)
            left = max(0.0, timeout - (time.monotonic() - started))
            try:
                return _wait_one(client, job_id, left, noted)
            except TimeoutError:
                status = client.get(job_id)["status"]
                raise WaitTimedOut(
                    f"job {job_id} is still {status} after {timeout:.0f}s; it stays {status}: "
                    f"backdrop status {job_id}"
                ) from None
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped waiting; job {job_id} goes on: backdrop status {job_id} "
            f"(or backdrop cancel {job_id})"
        ) from None


@contextmanager
def _ctrl_c_noted() -> Iterator[list[bool]]:
    """Ctrl-C noted in a list as well as raised. Python only prints a KeyboardInterrupt that
    lands in a finaliser or a callback (a database pool's, say) and goes on, and a wait that
    missed it would go on for its whole timeout."""
    noted: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted  # signal handlers belong to the main thread
        return

    def note(signum: int, frame: object) -> None:
        noted.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_one(client: Any, job_id: str, timeout: float, noted: list[bool]) -> dict[str, Any]:
    """client.wait in rounds of WAIT_ROUND_S, stopping at the first round after a Ctrl-C."""
    deadline = time.monotonic() + timeout
    while not noted:
        left = deadline - time.monotonic()
        try:
            (record,) = client.wait([job_id], timeout=max(0.0, min(WAIT_ROUND_S, left)))
            return dict(record)
        except TimeoutError:
            if left <= WAIT_ROUND_S:
                raise
    raise KeyboardInterrupt


def _no_worker_hint(client: Any, queue: str) -> str:
    from producer.stats import ping_workers

    workers = ping_workers(client.settings, [])
    if workers:
        return (
            f"still queued after {NO_WORKER_WARNING_S:.0f}s; workers {', '.join(workers)} are busy"
        )
    if workers is None:  # the embedded broker cannot be pinged
        return (
            f"still queued after {NO_WORKER_WARNING_S:.0f}s: is a worker running on the "
            f"'{queue}' queue? start one with: backdrop worker"
        )
    return (
        f"still queued after {NO_WORKER_WARNING_S:.0f}s: no worker answers on the broker; "
        "start one with: backdrop worker"
    )


def _as_location(client: Any, value: str, what: str) -> str:
    if "://" in value:
        return value
    path = Path(value)
    if not path.is_file():
        missing = BackgroundNotFound if what == "background" else InputNotFound
        raise missing(f"{what} {value} is neither a location (s3://, file://) nor a local file")
    from producer.storage import join

    location = join(client.settings.input_prefix, f"{uuid.uuid4().hex}-{path.name}")
    client.storage.upload_file(path, location)
    return location


def _writable_location(client: Any, field: str, path: Path) -> tuple[str, Path | None]:
    """A local output path (relative to the cwd): its location, when the local roots let jobs
    write there; else a fresh location under the output prefix, and the path to fetch the
    result to once the job succeeds."""
    location = path.resolve().as_uri()
    try:
        client.storage.check_allowed(location)
    except AccessDenied:
        from producer.storage import join

        suffix = "-mask.png" if field == "mask_output" else path.suffix
        return join(client.settings.output_prefix, f"{uuid.uuid4().hex}{suffix}"), path
    return location, None


def _save(client: Any, location: str | None, dest: Path, *, folder: bool = False) -> Path:
    """Write the object to `dest`, or into it (under the object's name) if it is a folder."""
    if location is None:
        raise InputNotFound("the job has no such output")
    if folder or dest.is_dir():
        dest = dest / unquote(location.rsplit("/", 1)[-1])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(client.storage.read(location))
    return dest


@cli.command()
@click.argument("job_id")
@click.argument("dest", required=False, type=click.Path())
@click.option("--mask", "want_mask", is_flag=True, help="the job's mask_output instead")
@reports_errors
def get(job_id: str, dest: str | None, want_mask: bool) -> None:
    """Download a succeeded job's output to DEST: a file, or a folder (one that exists or
    ends in '/') that gets the output's own name [default: the cwd]."""
    from producer.client import Client

    client = Client()
    record = client.get(client.resolve_id(job_id))
    if record["status"] != "succeeded":
        raise InvalidTransition(
            f"job {record['id']} is {record['status']}; only a succeeded job has an output"
        )
    location = record["mask_output"] if want_mask else record["output"]
    if want_mask and location is None:
        raise InputNotFound(f"job {record['id']} wrote no mask (submit with --mask-output)")
    folder = dest is None or dest.endswith("/")
    click.echo(str(_save(client, location, Path(dest or "."), folder=folder)))


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the record as JSON")
@reports_errors
def status(job_id: str, as_json: bool) -> None:
    """Show one job."""
    from producer.client import Client

    client = Client()
    record = client.get(client.resolve_id(job_id))
    if as_json:
        _print_json(record)
        return
    for key, value in record.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        click.echo(f"{key:20} {shown}")


@cli.command(name="jobs")
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in JobStatus]),
    help="only jobs in this status",
)
@click.option(
    "--output",
    "output",
    metavar="LOCATION",
    help="only the jobs that wrote this output: every run that produced it",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, help="most jobs listed")
@click.option("--json", "as_json", is_flag=True, help="print the records as JSON")
@reports_errors
def jobs_command(status_filter: str | None, output: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs, newest first."""
    from producer.client import Client

    records, _ = Client().list(status=status_filter, output=output, limit=limit)
    if as_json:
        _print_json(records)
        return
    click.echo(format_table(records))


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

    if job_id and all_failed:
        raise InvalidRequest("give a JOB_ID or --failed, not both")
    if not job_id and not all_failed:
        raise InvalidRequest("give the JOB_ID to retry, or --failed for every failed job")
    if overwrite and all_failed:
        raise InvalidRequest("--overwrite is for one JOB_ID: it lets that job replace objects")
    client = Client()
    if all_failed:
        records = client.retry_failed()
    else:
        records = [client.retry(client.resolve_id(job_id or ""), overwrite=overwrite)]
    for record in records:
        click.echo(f"{record['id']} {record['status']}")


@cli.command()
@click.argument("job_id")
@reports_errors
def cancel(job_id: str) -> None:
    """Cancel a queued job."""
    from producer.client import Client

    client = Client()
    record = client.cancel(client.resolve_id(job_id))
    click.echo(f"{record['id']} {record['status']}")


@cli.command()
@click.argument("source", required=False)
@click.option(
    "--output-prefix",
    help="where outputs go: <prefix>/<key under SOURCE>, with the format's extension "
    "(appended when the photo has another: cat.jpg → cat.jpg.png)",
)
@effect_options
@overwrite_option
@click.option("--dry-run", is_flag=True, help="count what would be skipped and submitted")
@click.option("--resume", "resume_id", metavar="ID", help="continue a killed or paused backfill")
@click.option("--pause", "pause_id", metavar="ID", help="stop submitting; --resume continues")
@click.option("--cancel", "cancel_id", metavar="ID", help="stop and cancel its queued jobs")
@click.option(
    "--max-in-flight",
    type=click.IntRange(1),
    help="most of its jobs queued or running at once [default: BACKDROP_BACKFILL_MAX_IN_FLIGHT]",
)
@click.option("--json", "as_json", is_flag=True, help="print the backfill record as JSON")
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
    """Process every photo under SOURCE (s3://bucket/prefix/, file:///folder/, a local folder)
    or in a manifest CSV (bucket,key lines) through the bulk queue. Exits non-zero when any
    photo failed; the failures are listed in the report CSV."""
    from producer.backfill import BackfillRunner
    from producer.progress import ProgressLine
    from producer.services import default_services

    engine = BackfillRunner(default_services())
    if pause_id or cancel_id:
        record = engine.pause(pause_id) if pause_id else engine.cancel(cancel_id or "")
        click.echo(f"{record['id']} {record['status']}")
        return
    fields = request_fields(**options)
    source = _folder_location(source)
    output_prefix = _folder_location(output_prefix)
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
    else:
        engine.get(resume_id)  # backfill_not_found before anything prints
    click.echo(f"backfill {resume_id}", err=True)
    progress = ProgressLine(sys.stderr)
    try:
        record = engine.run(resume_id, progress)
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted(
            f"backfill {resume_id} paused; continue with: backdrop backfill --resume {resume_id}"
        ) from None
    progress.close()
    if as_json:
        _print_json(record)
    else:
        click.echo(f"{record['id']} {record['status']} report={_shown_location(record['report'])}")
    _backfill_outcome(record)


def _folder_location(value: str | None) -> str | None:
    """A local folder path as its file:// prefix; anything else as given."""
    if value is None or "://" in value or value.lower().endswith(".csv"):
        return value
    return Path(value).resolve().as_uri() + "/"


def _backfill_outcome(record: dict[str, Any]) -> None:
    if record["status"] == "canceled":
        raise BackfillCanceled(f"backfill {record['id']} was canceled")
    if record["status"] == "paused":
        raise BackfillPaused(
            f"backfill {record['id']} is paused: backdrop backfill --resume {record['id']}"
        )
    failed = record["counts"]["failed"]
    if failed:
        total = record["counts"]["submitted"]
        raise JobsFailed(
            f"{failed} of {total} photos failed; their errors: {_shown_location(record['report'])}"
        )


def _queues(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    known = [q.value for q in Queue]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise click.BadParameter(
            f"{', '.join(unknown) or 'none given'}: choose from {', '.join(known)}"
        )
    return names


@cli.command()
@click.option(
    "--queues",
    default="interactive,bulk",
    callback=_queues,
    help=f"comma-separated queues to take jobs from ({', '.join(q.value for q in Queue)})",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    help="job threads [default: max batch + 2 per core (worker/threadplan.py)]",
)
@device_option
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    help="photos per model call [default: BACKDROP_MAX_BATCH, else 8 on a GPU, 1 on a CPU]",
)
@click.option(
    "--loglevel",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="log level",
)
@reports_errors
def worker(
    queues: list[str],
    concurrency: int | None,
    device: str | None,
    max_batch: int | None,
    loglevel: str,
) -> None:
    """Run a Celery worker: job threads feeding one batched model."""
    from worker.threadplan import prepare_environment

    prepare_environment()  # before _check_device imports torch
    settings = configure(device=device, max_batch=max_batch)
    _check_device(settings.device)
    from worker.runner import run_worker

    run_worker(settings, queues=queues, concurrency=concurrency, loglevel=loglevel.upper())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
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
    settings = configure(api_insecure_no_auth=insecure_no_auth)
    from producer.api import serve
    from producer.logs import configure as configure_logging

    configure_logging("INFO")

    def announce(url: str) -> None:
        # The token goes in the fragment, which the browser never sends: never in a log.
        how = " (add #token=YOUR_TOKEN, one of BACKDROP_API_TOKENS)" if settings.api_tokens else ""
        click.echo(f"dashboard: {url}{how}")

    serve(host, port, on_listening=announce)


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
def callbacks() -> None:
    """Completion callbacks."""


@callbacks.command(name="redeliver")
@click.argument("job_id")
@reports_errors
def callbacks_redeliver(job_id: str) -> None:
    """Send a finished job's callback again now, with a fresh schedule of retries."""
    from producer import outbox
    from producer.client import Client
    from producer.db import session_scope

    job_id = Client().resolve_id(job_id)
    with session_scope(get_settings().database_url) as session:
        outbox.redeliver(session, job_id, outbox.now())
    click.echo(f"{job_id} callback due now")


@cli.group()
def models() -> None:
    """Model weights, for workers without internet access."""


@models.command(name="pull")
@click.option(
    "--model",
    "model_name",
    type=click.Choice(list(get_args(ModelName))),
    help="which model's weights [default: BACKDROP_MODEL]",
)
@click.option("--push", "push_to", help="upload below this prefix, e.g. s3://models/backdrop")
@reports_errors
def models_pull(model_name: str | None, push_to: str | None) -> None:
    """Download and verify a model's published weights (torchvision's .pth, rembg's .onnx);
    optionally push them to a bucket.

    Prints the BACKDROP_WEIGHTS value for workers (the pushed location, or the local file).
    Needs the worker install (torch): run it where the worker image or extra is installed.
    """
    settings = get_settings()
    from producer.services import default_services

    model_name = model_name or settings.model
    if model_name in CLASS_AGNOSTIC:
        from worker.salient import pull_salient as pull
    else:
        from worker.weights import pull
    pulled = pull(model_name, push_to, upload=default_services().storage.upload_file)
    click.echo(f"{pulled.model}: {pulled.path} sha256:{pulled.sha256}", err=True)
    click.echo(f"BACKDROP_WEIGHTS={pulled.pushed_to or pulled.path}")


@cli.command()
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="demo-output",
    help="where the contact sheet, outputs and worker log go",
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
