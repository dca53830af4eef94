"""The `backdrop` command as a user runs it: the real entry point in a subprocess, on the
embedded default (SQLite, the broker folder, local storage) in a temporary data dir, with a
real worker where jobs must run."""

from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from producer.cli import JOB_FIELDS, cli
from producer.db import upgrade
from producer.request import JobRequest
from producer.settings import Settings
from tests.support.network import free_port
from tests.support.services import WorkerProcess

BACKDROP = Path(sys.executable).with_name("backdrop")
MOBILENET = "deeplabv3_mobilenet_v3_large"
ONE_LINE_ERROR = re.compile(r"^[a-z_]+: \S")


def photo_bytes(shade: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def run(
    args: list[str], env: dict[str, str], cwd: Path, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BACKDROP), *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,  # type: ignore[arg-type]
    )


def embedded_env(data: Path, weights: Path) -> dict[str, str]:
    return {
        "BACKDROP_DATABASE_URL": "",
        "BACKDROP_BROKER_URL": "",
        "BACKDROP_LOCAL_ROOTS": "",
        "BACKDROP_INPUT_PREFIX": "",
        "BACKDROP_OUTPUT_PREFIX": "",
        "BACKDROP_DATA_DIR": str(data),
        "BACKDROP_MODEL": MOBILENET,
        "BACKDROP_WEIGHTS": str(weights),
        "BACKDROP_MODEL_INPUT_SIZE": "128",
        "BACKDROP_DEVICE": "cpu",
        "BACKDROP_MAX_BATCH": "2",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """The user's working directory, with a.jpg in it."""
    (tmp_path / "a.jpg").write_bytes(photo_bytes(30))
    return tmp_path


@pytest.fixture
def env(here: Path, mobilenet_weights: Path) -> dict[str, str]:
    data = here / "data"
    upgrade(Settings(data_dir=data).database_url)
    return embedded_env(data, mobilenet_weights)


@pytest.fixture(scope="module")
def served(mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir with a real worker on both queues; yields the data dir."""
    folder = tmp_path_factory.mktemp("served")
    data = folder / "data"
    upgrade(Settings(data_dir=data).database_url)
    worker = WorkerProcess(embedded_env(data, mobilenet_weights), folder / "worker.log").start()
    try:
        worker.wait_ready()
        yield data
    finally:
        worker.stop()


@pytest.fixture
def served_env(served: Path, mobilenet_weights: Path) -> dict[str, str]:
    return embedded_env(served, mobilenet_weights)


# --- options ------------------------------------------------------------------------------


def commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_option_of_every_command_has_help_and_lists_its_choices() -> None:
    for name, command in commands(cli):
        for option in command.params:
            if isinstance(option, click.Option):
                assert option.help, f"backdrop {name} {option.opts[0]} has no help"
        shown = CliRunner().invoke(cli, [*name.split(), "--help"], terminal_width=200)
        assert shown.exit_code == 0, shown.output
    submit = " ".join(CliRunner().invoke(cli, ["submit", "--help"]).output.split())
    assert "what happens to the background [default: remove]" in submit
    assert "--queue [interactive|bulk]" in submit


@pytest.mark.parametrize(
    ("command", "refused"),
    [
        ("process", ["--output", "--mask-output", "--queue", "--idempotency-key", "--overwrite"]),
        ("backfill", ["--output", "--mask-output", "--idempotency-key", "--queue", "--mask"]),
    ],
)
def test_options_a_command_would_ignore_are_not_offered(command: str, refused: list[str]) -> None:
    offered = {opt for param in cli.commands[command].params for opt in param.opts}
    assert offered.isdisjoint(refused)
    assert "--jpeg-quality" in offered


def test_submit_offers_one_flag_per_job_field_and_no_other_job_flag() -> None:
    submit = cli.commands["submit"]
    own = {"input_location", "wait", "timeout", "as_json"}
    flags = {param.name.removesuffix("_") for param in submit.params if param.name not in own}
    assert flags == set(JobRequest.model_fields) - {"input"} == set(JOB_FIELDS)


def test_version_prints_the_package_version(env: dict[str, str], here: Path) -> None:
    shown = run(["--version"], env, here)
    assert shown.returncode == 0 and re.fullmatch(r"backdrop, version \S+\n", shown.stdout)


# --- no tracebacks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "extra_env", "expected"),
    [
        (["process", "a.jpg", "o.png", "--model", "resnet"], {}, "Invalid value for '--model'"),
        (["jobs"], {"BACKDROP_MODEL": "resnet"}, "invalid_settings: BACKDROP_MODEL"),
        (["stats"], {"BACKDROP_MAX_BATCH": "0"}, "invalid_settings: BACKDROP_MAX_BATCH"),
        (["process", "a.jpg", "o.png", "--device", "cuda"], {}, "device_unavailable: "),
        (["worker", "--queues", "interactve"], {}, "interactve: choose from interactive, bulk"),
        (["backfill", "--resume", "nope"], {}, "backfill_not_found: "),
        (["retry"], {}, "invalid_request: give the JOB_ID to retry, or --failed"),
        (["process", "a.jpg", "o.png", "--mask", "nothing.png"], {}, "input_not_found: mask"),
        (["submit", "a.jpg", "--mask", "nothing.png"], {}, "input_not_found: mask nothing.png"),
        (
            ["process", "a.jpg", "o.png", "--effect", "replace", "--background", "notes.txt"],
            {},
            "invalid_image: background image: not an image",
        ),
    ],
)
def test_a_mistake_is_one_line_never_a_traceback(
    args: list[str], extra_env: dict[str, str], expected: str, env: dict[str, str], here: Path
) -> None:
    if "--device" in args and _cuda_available():
        pytest.skip("this host has CUDA")
    (here / "notes.txt").write_text("not a photo")
    finished = run(args, env | extra_env, here)
    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr
    assert expected in finished.stderr


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- process: formats, folders, pipes ----------------------------------------------------


@pytest.mark.parametrize(
    ("output", "flags", "expected"),
    [
        ("out.png", ["--format", "webp"], "--format webp conflicts with the extension of out.png"),
        ("out.gif", [], ".gif is not an output format"),
        ("out", [], "out has no extension"),
    ],
)
def test_the_format_follows_the_extension_and_a_mismatch_is_refused(
    output: str, flags: list[str], expected: str, env: dict[str, str], here: Path
) -> None:
    finished = run(["process", "a.jpg", output, *flags], env, here)
    assert finished.returncode == 1
    assert finished.stderr.strip() == f"invalid_request: {expected}" or expected in finished.stderr
    assert not (here / output).exists()


def test_a_folder_and_files_are_processed_into_a_folder_with_names_kept(
    env: dict[str, str], here: Path
) -> None:
    photos = here / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "cat.jpg").write_bytes(photo_bytes(10))
    (photos / "cat.png").write_bytes(photo_bytes(20, "PNG"))
    (photos / "sub" / "dog one.webp").write_bytes(photo_bytes(40, "WEBP"))
    (photos / "notes.txt").write_text("not a photo")

    finished = run(["process", "photos", "a.jpg", "results", "--format", "jpeg"], env, here)

    assert finished.returncode == 0, finished.stderr
    written = sorted(str(p.relative_to(here / "results")) for p in (here / "results").rglob("*"))
    assert written == ["a.jpg", "cat.jpg.jpg", "cat.png.jpg", "sub", "sub/dog one.jpg"]
    assert Image.open(here / "results" / "sub" / "dog one.jpg").format == "JPEG"
    assert "4 of 4 photos written to results" in finished.stdout
    # One model load for all of them: the weights are read once.
    assert "Traceback" not in finished.stderr


def test_stdin_to_stdout_and_the_extension_picks_the_format(
    env: dict[str, str], here: Path
) -> None:
    piped = subprocess.run(
        [str(BACKDROP), "process", "-", "-"],
        env={**os.environ, **env},
        cwd=here,
        input=(here / "a.jpg").read_bytes(),
        capture_output=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr
    assert Image.open(io.BytesIO(piped.stdout)).format == "PNG"

    webp = run(["process", "a.jpg", "out.webp"], env, here)
    assert webp.returncode == 0, webp.stderr
    assert Image.open(here / "out.webp").format == "WEBP"

    avif = run(["process", "a.jpg", "out.avif", "--background", "transparent"], env, here)
    assert avif.returncode == 0, avif.stderr
    assert Image.open(here / "out.avif").format == "AVIF"
    assert Image.open(here / "out.avif").mode == "RGBA"


# --- jobs through a real worker: submit, get, backfill -----------------------------------


def test_submit_wait_prints_the_id_first_and_where_the_output_went_and_get_fetches_it(
    served_env: dict[str, str], here: Path
) -> None:
    finished = run(["submit", "a.jpg", "--wait"], served_env, here)
    assert finished.returncode == 0, finished.stderr
    job_id = finished.stderr.split()[0]
    assert finished.stdout.split()[:2] == [job_id, "succeeded"]
    shown = Path(finished.stdout.split()[2])
    assert shown.is_file() and shown.suffix == ".png"

    fetched = run(["get", job_id, "copies/"], served_env, here, input="")
    assert fetched.returncode == 0, fetched.stderr
    assert (here / "copies" / shown.name).read_bytes() == shown.read_bytes()


def test_submit_output_takes_a_path_relative_to_the_cwd(
    served_env: dict[str, str], here: Path
) -> None:
    finished = run(["submit", "a.jpg", "--output", "res.jpg"], served_env, here)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split()[1:] == ["succeeded", "res.jpg"]
    assert Image.open(here / "res.jpg").format == "JPEG"


def test_a_worker_crops_to_the_masks_box_plus_margin_and_fits_the_canvas(
    served_env: dict[str, str], here: Path
) -> None:
    """The crop through a real worker: a known rectangle as the mask, so the box is known."""
    pixels = np.full((300, 400, 3), (40, 90, 160), np.uint8)
    pixels[100:180, 150:250] = (220, 40, 30)
    alpha = np.zeros((300, 400), np.uint8)
    alpha[100:180, 150:250] = 255
    Image.fromarray(pixels).save(here / "box.png")
    Image.fromarray(alpha).save(here / "box-mask.png")
    flags = ["--mask", "box-mask.png", "--crop", "subject", "--margin", "0.1"]

    cropped = run(["submit", "box.png", *flags, "--output", "crop.png"], served_env, here)
    canvas_flags = ["--size", "240x240", "--background", "#000000", "--output", "framed.jpg"]
    framed = run(["submit", "box.png", *flags, *canvas_flags], served_env, here)

    assert cropped.returncode == 0 and framed.returncode == 0, cropped.stderr + framed.stderr
    # The 100×80 box plus 10% of its longer side on each side.
    assert Image.open(here / "crop.png").size == (120, 100)
    canvas = np.asarray(Image.open(here / "framed.jpg")).astype(int)
    assert canvas.shape == (240, 240, 3) and canvas[0, 0].max() <= 8
    assert np.abs(canvas[120, 120] - (220, 40, 30)).max() <= 30


def test_a_backfill_over_colliding_names_processes_every_photo_as_its_dry_run_said(
    served_env: dict[str, str], served: Path, here: Path
) -> None:
    folder = served / "inputs" / f"collide-{here.name}"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(photo_bytes(10))
    (folder / "cat.png").write_bytes(photo_bytes(20, "PNG"))
    (folder / "my dog.png").write_bytes(photo_bytes(40, "PNG"))
    out = served / "outputs" / f"collide-{here.name}"
    args = ["backfill", str(folder), "--output-prefix", str(out)]

    dry = run([*args, "--dry-run"], served_env, here)
    finished = run(args, served_env, here, stdin=subprocess.DEVNULL)

    assert dry.stdout.strip() == "listed 3 · would_skip 0 · would_submit 3"
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert "succeeded 3 · failed 0" in finished.stderr  # the counts, without a terminal
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "cat.jpg.png",
        "cat.png",
        "my dog.png",
    ]


def test_a_backfill_with_failed_photos_exits_non_zero_and_names_its_report(
    served_env: dict[str, str], served: Path, here: Path
) -> None:
    folder = served / "inputs" / f"some-bad-{here.name}"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(photo_bytes(10, "PNG"))
    (folder / "broken.png").write_bytes(b"not an image at all")
    out = served / "outputs" / f"some-bad-{here.name}"

    finished = run(["backfill", str(folder), "--output-prefix", str(out)], served_env, here)

    assert finished.returncode == 1
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith("jobs_failed: 1 of 2 photos failed; their errors: ")
    assert Path(last.rsplit(" ", 1)[-1]).is_file()
    assert (out / "good.png").is_file()


def test_a_backfill_of_a_missing_folder_is_an_error_not_zero_photos(
    served_env: dict[str, str], served: Path, here: Path
) -> None:
    finished = run(
        ["backfill", str(served / "inputs" / "nope"), "--output-prefix", str(served / "outputs")],
        served_env,
        here,
    )
    assert finished.returncode == 1
    assert finished.stderr.startswith("input_not_found: ") and "no files there" in finished.stderr


def test_local_roots_set_for_the_cli_alone_keep_submit_working_and_fail_a_backfill_fast(
    served_env: dict[str, str], here: Path
) -> None:
    photos = here / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(photo_bytes(i * 50, "PNG"))
    cli_only = served_env | {"BACKDROP_LOCAL_ROOTS": f"{photos},{here / 'out'}"}

    submitted = run(["submit", "a.jpg", "--wait"], cli_only, here)
    backfilled = run(["backfill", "photos", "--output-prefix", "out"], cli_only, here)

    assert submitted.returncode == 0, submitted.stderr
    assert backfilled.returncode == 1
    message = backfilled.stderr.strip().splitlines()[-1]
    assert message.startswith("backfill_failed: its first 3 jobs all failed access_denied")
    assert "BACKDROP_LOCAL_ROOTS" in message and "--resume" in message
    assert "Traceback" not in backfilled.stderr


# --- waiting with no worker --------------------------------------------------------------


def test_submit_wait_with_no_worker_warns_and_times_out_naming_the_job(
    env: dict[str, str], here: Path
) -> None:
    finished = run(["submit", "a.jpg", "--wait", "--timeout", "6"], env, here)

    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    job_id = lines[0].split()[0]
    assert lines[0] == f"{job_id} queued: waiting (Ctrl-C stops waiting)"
    assert lines[1].startswith("warning: still queued after 5s: is a worker running")
    assert lines[-1] == (
        f"timeout: job {job_id} is still queued after 6s; it stays queued: backdrop status {job_id}"
    )


def test_ctrl_c_while_waiting_says_how_to_follow_the_job(env: dict[str, str], here: Path) -> None:
    waiting = subprocess.Popen(
        [str(BACKDROP), "submit", "a.jpg", "--wait"],
        env={**os.environ, **env},
        cwd=here,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stderr is not None
    first = waiting.stderr.readline()
    waiting.send_signal(signal.SIGINT)
    rest = waiting.stderr.read()
    waiting.wait(timeout=30)

    job_id = first.split()[0]
    assert waiting.returncode == 130
    assert f"backdrop status {job_id}" in rest and "Traceback" not in rest


def test_a_refused_request_reads_without_pydantics_prefix(env: dict[str, str], here: Path) -> None:
    finished = run(["submit", "a.jpg", "--effect", "replace"], env, here)
    assert finished.returncode == 1
    assert finished.stderr == (
        "invalid_request: request: effect 'replace' needs background: the location of an image\n"
    )


def test_the_demo_labels_its_photos_columns_and_white_versus_transparent(
    env: dict[str, str], here: Path
) -> None:
    from worker.demo import COLUMNS, HEADER, PHOTOS, THUMB

    finished = run(["demo", "--output-dir", "shown"], env, here)

    # Random weights may find no subject in a photo; the sheet is drawn either way.
    assert "Traceback" not in finished.stderr, finished.stderr
    assert "chelsea: Chelsea the cat" in finished.stdout
    assert "remove-white" in finished.stdout and "remove-transparent" in finished.stdout
    sheet = Image.open(here / "shown" / "contact-sheet.png")
    assert sheet.size == (THUMB * len(COLUMNS), HEADER + THUMB * len(PHOTOS))
    header = np.asarray(sheet.convert("L"))[:HEADER]
    for column in range(len(COLUMNS)):  # each column's name is drawn: dark text on white
        assert header[:, column * THUMB : (column + 1) * THUMB].min() < 128


def test_a_job_is_found_by_the_first_characters_of_its_id(env: dict[str, str], here: Path) -> None:
    job_id = run(["submit", "a.jpg"], env, here).stdout.strip()

    shown = run(["status", job_id[:8]], env, here)
    canceled = run(["cancel", job_id[:8]], env, here)
    too_short = run(["status", job_id[:3]], env, here)

    assert shown.returncode == 0 and f"id                   {job_id}" in shown.stdout
    assert canceled.stdout.strip() == f"{job_id} canceled"
    assert too_short.returncode == 1 and too_short.stderr.startswith("job_not_found: ")


def test_the_api_says_where_its_dashboard_is_and_how_to_add_a_token_without_printing_it(
    env: dict[str, str], here: Path
) -> None:
    token = "t" * 40
    port = free_port()
    serving = subprocess.Popen(
        [str(BACKDROP), "api", "--port", str(port)],
        env={**os.environ, **env, "BACKDROP_API_TOKENS": token},
        cwd=here,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serving.stdout is not None
        said, _, _ = select.select([serving.stdout], [], [], 60)
        assert said, "backdrop api printed nothing in a minute"
        line = serving.stdout.readline().strip()
        # Printed once it listens: the page is there.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=30) as page:
            assert page.status == 200
    finally:
        serving.send_signal(signal.SIGINT)
        output, errors = serving.communicate(timeout=30)

    assert line == (
        f"dashboard: http://127.0.0.1:{port}/dashboard"
        " (add #token=YOUR_TOKEN, one of BACKDROP_API_TOKENS)"
    )
    assert token not in line + output + errors


def test_a_ctrl_c_that_python_dropped_still_stops_the_wait() -> None:
    from producer import cli

    noted: list[bool] = []

    class Client:
        def wait(self, job_ids: list[str], *, timeout: float) -> list[dict[str, str]]:
            # The handler ran, but its KeyboardInterrupt landed in a finaliser: only printed.
            noted.append(True)
            raise TimeoutError

    with pytest.raises(KeyboardInterrupt):
        cli._wait_one(Client(), "job", 3600.0, noted)
