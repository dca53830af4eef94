"""docker-compose.yml: valid against the Compose Specification, and production-shaped.

No Docker engine runs the file here, so the schema and these checks are what stands between
a typo and a stack that does not come up.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from producer.settings import Settings
from tests.support.required import require_service

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "infra" / "schemas" / "compose-spec.json"
ENV_EXAMPLE = REPO / ".env.example"
PROMETHEUS_FILE = REPO / "infra" / "prometheus.yml"
WORKERS = ("worker", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}, whichever of its two forms the file uses."""
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: spec.get("condition", "service_started") for name, spec in value.items()}


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert problems == []


def test_compose_file_uses_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_every_service_has_a_healthcheck_or_is_a_one_shot(services: dict[str, Any]) -> None:
    for name, service in services.items():
        healthcheck = service.get("healthcheck", {})
        checked = bool(healthcheck.get("test")) and not healthcheck.get("disable", False)
        one_shot = service.get("restart") == "no"
        assert checked or one_shot, f"{name}: needs a healthcheck or restart: 'no'"


def test_long_running_services_restart_by_themselves(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if service.get("restart") != "no":
            assert service.get("restart") in {"always", "unless-stopped"}, name


def test_redis_persists_with_an_append_only_file_on_a_named_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    command = redis["command"]
    arguments = " ".join(command) if isinstance(command, list) else command
    assert re.search(r"--appendonly\s+yes", arguments)
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data"
    assert volume in compose["volumes"]


def test_worker_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
        for device in devices
    )


def test_every_image_is_pinned_to_a_tag_other_than_latest(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name}: neither image nor build"
            continue
        if "@sha256:" in image:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


def test_worker_and_api_wait_for_the_migration_to_succeed(services: dict[str, Any]) -> None:
    assert services["migrate"]["restart"] == "no"
    for name in ("worker", "api"):
        assert depends_on(services[name]).get("migrate") == "service_completed_successfully"


def test_worker_waits_for_the_broker_and_the_store_to_be_healthy(services: dict[str, Any]) -> None:
    conditions = depends_on(services["worker"])
    assert conditions["redis"] == "service_healthy"
    assert conditions["s3"] == "service_healthy"


def test_one_shot_bucket_creation_waits_for_a_healthy_store(services: dict[str, Any]) -> None:
    assert depends_on(services["s3-init"]) == {"s3": "service_healthy"}
    assert services["s3-init"]["restart"] == "no"


def test_every_dependency_names_a_service(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert set(depends_on(service)) <= set(services), name


def test_every_named_volume_is_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/")):
                assert source in compose.get("volumes", {}), f"{name}: {source}"


def test_every_bind_mounted_file_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_every_dockerfile_exists_and_pins_its_base_image(services: dict[str, Any]) -> None:
    builds = [service["build"] for service in services.values() if "build" in service]
    assert builds
    for build in builds:
        dockerfile = REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), dockerfile
        text = dockerfile.read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE))
        assert bases, dockerfile
        for base in set(bases) - stages:
            assert ":" in base and not base.endswith(":latest"), f"{dockerfile}: {base}"


def test_images_run_as_a_non_root_user() -> None:
    for dockerfile in (REPO / "infra").glob("*.Dockerfile"):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
        assert users and users[-1] not in {"root", "0"}, dockerfile


def test_api_image_installs_no_torch() -> None:
    text = (REPO / "infra" / "api.Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", text)
    assert "[worker" not in text


def test_services_share_one_backdrop_environment(services: dict[str, Any]) -> None:
    required = {
        "BACKDROP_DATABASE_URL",
        "BACKDROP_BROKER_URL",
        "BACKDROP_S3_ENDPOINT_URL",
        "BACKDROP_OUTPUT_PREFIX",
        "BACKDROP_ALLOWED_BUCKETS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    environments = [services[name]["environment"] for name in ("worker", "api", "migrate")]
    for environment in environments:
        assert required <= set(environment)
        assert environment["BACKDROP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["BACKDROP_BROKER_URL"] == "redis://redis:6379/0"
    assert len({env["BACKDROP_DATABASE_URL"] for env in environments}) == 1


def run_docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    require_service("docker-compose (Debian package)", binary is not None, "apt install")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKDROP_", "COMPOSE_"))}
    return subprocess.run(
        [str(binary), "--file", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**clean, **env},
    )


GENERATED_TOKEN = secrets.token_urlsafe(32)


def test_docker_compose_accepts_the_file_once_api_tokens_are_set() -> None:
    result = run_docker_compose("config", "-q", env={"BACKDROP_API_TOKENS": GENERATED_TOKEN})
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_api_tokens() -> None:
    result = run_docker_compose("config", "-q", env={})
    assert result.returncode != 0
    assert "BACKDROP_API_TOKENS" in result.stderr


def test_docker_compose_accepts_the_example_environment_file_once_a_token_is_set() -> None:
    # A variable set in the shell wins over the env file, as it does for `docker compose up`.
    env = {"BACKDROP_API_TOKENS": GENERATED_TOKEN}
    result = run_docker_compose("--env-file", str(ENV_EXAMPLE), "config", "-q", env=env)
    assert result.returncode == 0, result.stderr


def example_value(name: str) -> str:
    (value,) = re.findall(rf"^{name}=(.*)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    return value


def test_the_example_environment_ships_no_working_api_token() -> None:
    assert example_value("BACKDROP_API_TOKENS") == ""
    result = run_docker_compose("--env-file", str(ENV_EXAMPLE), "config", "-q", env={})
    assert result.returncode != 0
    assert "BACKDROP_API_TOKENS" in result.stderr


def published_hosts(services: dict[str, Any]) -> dict[str, list[str]]:
    """Each service's published host addresses, with ${VAR:-default} at its default."""
    hosts: dict[str, list[str]] = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            resolved = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(port))
            parts = resolved.split(":")
            hosts.setdefault(name, []).append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return hosts


def test_every_published_port_is_on_loopback_unless_told_otherwise(
    services: dict[str, Any],
) -> None:
    hosts = published_hosts(services)
    assert "api" in hosts
    assert all(host == "127.0.0.1" for published in hosts.values() for host in published), hosts
    assert example_value("BACKDROP_API_BIND") == "127.0.0.1"


def test_docker_compose_publishes_the_api_where_api_bind_says() -> None:
    env = {"BACKDROP_API_TOKENS": GENERATED_TOKEN}
    default = run_docker_compose("config", env=env)
    assert default.returncode == 0, default.stderr
    api = yaml.safe_load(default.stdout)["services"]["api"]
    assert [str(port).split(":")[0] for port in api["ports"]] == ["127.0.0.1"]
    chosen = run_docker_compose("config", env=env | {"BACKDROP_API_BIND": "0.0.0.0"})
    api = yaml.safe_load(chosen.stdout)["services"]["api"]
    assert [str(port).split(":")[0] for port in api["ports"]] == ["0.0.0.0"]


def test_the_gpu_and_cpu_workers_are_alternative_profiles(services: dict[str, Any]) -> None:
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker"]["environment"]["BACKDROP_DEVICE"] == "cuda"
    assert services["worker-cpu"]["environment"]["BACKDROP_DEVICE"] == "cpu"
    assert "deploy" not in services["worker-cpu"]
    # Both run the same image and command: only the device differs.
    for key in ("image", "command", "volumes", "healthcheck"):
        assert services["worker"][key] == services["worker-cpu"][key], key
    # Nothing else may depend on a worker, or a profile would be dragged in.
    for name, service in services.items():
        assert not set(depends_on(service)) & {"worker", "worker-cpu"}, name


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_workers_have_time_to_end_every_job_in_hand_on_a_warm_shutdown(
    services: dict[str, Any],
) -> None:
    """No attempt runs past BACKDROP_JOB_TIMEOUT_S, then may wait RECORD_PATIENCE_S to record
    its outcome: the grace period covers both (the same rule as tests/test_k8s.py)."""
    from producer.settings import Settings
    from worker.tasks import RECORD_PATIENCE_S

    for name in WORKERS:
        environment = services[name].get("environment", {})
        timeout = float(environment.get("BACKDROP_JOB_TIMEOUT_S", Settings().job_timeout_s))
        grace = seconds(services[name]["stop_grace_period"])
        assert grace >= timeout + RECORD_PATIENCE_S, name


def test_prometheus_scrapes_the_api_and_every_worker_where_they_serve_metrics(
    services: dict[str, Any],
) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_targets = jobs["backdrop-api"]["static_configs"][0]["targets"]
    api_port = services["api"]["command"][services["api"]["command"].index("--port") + 1]
    assert api_targets == [f"api:{api_port}"]
    (discovery,) = jobs["backdrop-worker"]["dns_sd_configs"]
    assert set(discovery["names"]) == {"worker", "worker-cpu"}
    for name in discovery["names"]:
        port = services[name]["environment"]["BACKDROP_WORKER_METRICS_PORT"]
        assert discovery["port"] == int(port), name
    mounts = [volume.split(":") for volume in services["prometheus"]["volumes"]]
    assert ["./infra/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts


def test_the_example_environment_documents_every_setting_and_every_compose_variable() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    settings = {f"BACKDROP_{name.upper()}" for name in Settings.model_fields}
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert settings - documented == set()
    assert interpolated - documented == set()
    assert "COMPOSE_PROFILES" in documented


def test_the_weights_location_passes_through_without_hiding_baked_weights(
    services: dict[str, Any],
) -> None:
    # A null value: set only when the shell or .env sets it, so an unset one leaves the
    # image's BACKDROP_WEIGHTS (baked weights) alone.
    for name in ("worker", "worker-cpu"):
        environment = services[name]["environment"]
        assert "BACKDROP_WEIGHTS" in environment and environment["BACKDROP_WEIGHTS"] is None
