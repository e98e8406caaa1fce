"""The Kubernetes manifests (deploy/kubernetes/), checked without a cluster.

Every object validates against the Kubernetes OpenAPI schemas bundled by kubernetes-validate
(strict: an unknown or misplaced field fails), and the seams between the manifests and the
code hold: probe paths are the app's routes, ports agree with the Dockerfile, every env var
is a setting the gateway reads, the grace period covers the shutdown, selectors select the
pods. The numbers behind requests and limits are derived in docs/capacity.md.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import opentelemetry.environment_variables
import opentelemetry.sdk.environment_variables
import pytest
import yaml
from kubernetes_validate.utils import ValidationError
from prometheus_client import CollectorRegistry

from gateway.server import Gateway
from gateway.settings import Settings, SettingsError

from conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBE / "kustomization.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SETTINGS_SOURCE = ROOT / "service" / "gateway" / "settings.py"
ALERTS = ROOT / "grafana" / "prometheus" / "alerts.yml"

# The oldest Kubernetes the manifests support (the native preStop `sleep` action is on by
# default from 1.30) and the newest schema the pinned kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Custom resources: kubernetes-validate only bundles the built-in API schemas.
CRD_KINDS = {"PodMonitor", "ServiceMonitor"}
POD_NAME = "gateway-7d9f8b6c5-x2k4q"  # what the downward API's metadata.name looks like

# Memory per pod (docs/capacity.md, from docs/performance.md and README's soak): RSS of a
# fresh process, and per connection user-space RSS (20.0-24.7 KiB measured) plus kernel
# socket memory, which the pod's cgroup is charged for too.
BASELINE_MIB = 57
PER_CONNECTION_KIB = 40
MEMORY_HEADROOM = 0.25  # share of the limit left for stalled clients' buffers, storms, GC


# --- readers ---------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p != KUSTOMIZATION)


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def only(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def deployment() -> dict[str, Any]:
    return only("Deployment")


def pod_spec() -> dict[str, Any]:
    return dict(deployment()["spec"]["template"]["spec"])


def container() -> dict[str, Any]:
    (gateway,) = pod_spec()["containers"]
    return dict(gateway)


def pod_labels() -> dict[str, str]:
    return dict(deployment()["spec"]["template"]["metadata"]["labels"])


def container_port(ref: str | int) -> int:
    """A container port given by name or number, as probes and Services may name it."""
    for port in container()["ports"]:
        if ref in (port["name"], port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"no container port {ref!r}")


def env() -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container()["env"]}


def env_values() -> dict[str, str]:
    """The container's environment as the pod would see it (downward API filled in)."""
    values = {}
    for name, var in env().items():
        if "value" in var:
            values[name] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
            values[name] = POD_NAME
    return values


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, or a Service's plain map) matches `labels`."""
    match = selector.get("matchLabels", selector)
    assert "matchExpressions" not in selector, "extend this helper before using expressions"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def setting_env_names() -> set[str]:
    """Every variable `Settings.from_env` reads: the string literals in its source."""
    tree = ast.parse(SETTINGS_SOURCE.read_text())
    (from_env,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "from_env"
    ]
    return {
        node.value
        for node in ast.walk(from_env)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"GATEWAY_[A-Z0-9_]+|NATS_URL", node.value)
    }


def otel_env_names() -> set[str]:
    """The standard OTEL_* variables the OpenTelemetry API and SDK define."""
    modules = (opentelemetry.environment_variables, opentelemetry.sdk.environment_variables)
    return {name for module in modules for name in dir(module) if name.startswith("OTEL_")}


def app_routes() -> set[str]:
    """The paths the real app serves, as the server builds it."""
    gateway = Gateway(make_settings("nats://127.0.0.1:4222"), CollectorRegistry())
    return {route.path for route in gateway.app.routes}


def dockerfile_runtime() -> str:
    return DOCKERFILE.read_text().replace("\\\n", " ").split("\nFROM ")[-1]


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (kustomize is built in)"
)


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schema(version: str) -> None:
    """Each built-in object is valid for Kubernetes 1.30 and 1.37, unknown fields rejected."""
    checked = set()
    for path, doc in documents():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{path.name}: {where}: {error.message}")
        checked.add(doc["kind"])
    assert checked == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_the_schema_check_bites() -> None:
    """Strict validation rejects a misspelt field, and 1.28's schema the preStop sleep."""
    broken = deployment()
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(ValidationError, match="'sleep' was unexpected"):
        kubernetes_validate.validate(deployment(), "1.28", strict=True)


def test_pod_monitor_scrapes_metrics_of_the_gateway_pods() -> None:
    """The PodMonitor selects the pods and scrapes /metrics on the named port as job=gateway."""
    # A Prometheus Operator CRD: kubernetes-validate bundles only the built-in schemas, so
    # the fields used here are checked by hand.
    monitor = only("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}
    assert selects(spec["selector"], pod_labels())
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert endpoint["port"] in {port["name"] for port in container()["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["path"] in app_routes()
    for duration in (endpoint["interval"], endpoint["scrapeTimeout"]):
        assert re.fullmatch(r"\d+s", duration)
    assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])
    job = pod_labels()[spec["jobLabel"]]
    assert f'up{{job="{job}"}}' in ALERTS.read_text()


# --- kustomize ---------------------------------------------------------------------------------


def test_kustomization_lists_exactly_the_manifests() -> None:
    """Every YAML file beside kustomization.yaml is a resource of it, and nothing else is."""
    resources = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == {path.name for path in manifest_files()}


def test_kustomization_labels_everything_and_names_the_image() -> None:
    """Labels skip selectors; `images:` names the Deployment's image, tagged the package version."""
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    assert "commonLabels" not in kustomization, "deprecated, and it rewrites selectors"
    (labels,) = kustomization["labels"]
    assert labels["includeSelectors"] is False
    assert labels["includeTemplates"] is True
    assert not set(labels["pairs"]) & set(pod_labels()), "selector labels stay in the files"
    (image,) = kustomization["images"]
    name, _, tag = container()["image"].rpartition(":")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image["name"] == name
    assert image["newTag"] == tag == version


@needs_kubectl
def test_kustomize_build_validates_and_an_overlay_overrides_the_image(tmp_path: Path) -> None:
    """The built base still validates, and an overlay's `images:` entry replaces name and tag."""
    built = kustomize_build(KUBE)
    assert len(built) == len(list(documents()))
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "levels"
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)

    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE, tmp_path)],  # kustomize wants it relative
        "images": [{"name": "gateway", "newName": "registry.example.com/gw", "newTag": "9.9.9"}],
    }
    (tmp_path / "kustomization.yaml").write_text(json.dumps(overlay))
    (deployed,) = [doc for doc in kustomize_build(tmp_path) if doc["kind"] == "Deployment"]
    (built_container,) = deployed["spec"]["template"]["spec"]["containers"]
    assert built_container["image"] == "registry.example.com/gw:9.9.9"


# --- the seams with the code -------------------------------------------------------------------


def test_probes_ask_real_routes_readiness_fails_fast() -> None:
    """Readiness asks /ready and fails fast; liveness and startup ask /health; all are routes."""
    gateway = container()
    routes = app_routes()
    paths = {}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = gateway[probe]["httpGet"]
        assert get["path"] in routes, f"{probe}: {get['path']} is not a route"
        assert container_port(get["port"]) == Settings().port
        paths[probe] = get["path"]
    assert paths == {
        "readinessProbe": "/ready",
        "livenessProbe": "/health",
        "startupProbe": "/health",
    }
    readiness = gateway["readinessProbe"]
    assert 2 <= readiness["periodSeconds"] <= 5
    assert readiness["failureThreshold"] <= 2
    startup = gateway["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    liveness = gateway["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, "no hair trigger"


def test_ports_agree_across_container_service_dockerfile_and_settings() -> None:
    """Container port = Dockerfile EXPOSE = the settings' default = the Service's target."""
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile_runtime(), re.M)
    (port,) = container()["ports"]
    assert port["containerPort"] == int(exposed) == Settings().port
    assert "GATEWAY_PORT" not in env(), "the image's default is the port declared here"
    (service_port,) = only("Service")["spec"]["ports"]
    assert service_port["port"] == int(exposed)
    assert container_port(service_port["targetPort"]) == port["containerPort"]


def test_container_runs_the_images_command_as_its_user() -> None:
    """The command is the Dockerfile's CMD and the uid its USER."""
    runtime = dockerfile_runtime()
    cmd = re.search(r"^CMD (\[.*\])$", runtime, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", runtime, re.M)
    assert cmd
    assert user
    gateway = container()
    assert gateway["command"] == json.loads(cmd[1])
    assert gateway["securityContext"]["runAsUser"] == int(user[1])
    assert gateway["securityContext"]["runAsGroup"] == int(user[2])


def test_every_env_var_is_a_setting_or_a_standard_otel_variable() -> None:
    """Each env var is read by Settings.from_env or the OTel SDK: a typo is never ignored."""
    known = setting_env_names()
    assert {"NATS_URL", "GATEWAY_DRAIN_S", "GATEWAY_MAX_CONNECTIONS"} <= known
    unknown = set(env()) - known - otel_env_names()
    assert not unknown, f"not read by the gateway: {sorted(unknown)}"


def test_env_is_a_valid_fleet_configuration() -> None:
    """The env parses: replica id = pod name, JSON logs, 3 stream replicas, consumer lease."""
    settings = Settings.from_env(env_values())
    assert env()["GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert settings.replica_id == POD_NAME
    assert settings.stream_replicas == 3
    assert settings.log_format == "json"
    assert settings.consumer_lease, "identical replicas need the lease"
    assert settings.nats_servers == ("nats://nats:4222",)


def test_service_links_are_off_because_they_would_break_the_settings() -> None:
    """Service links are off: the `gateway` Service would inject GATEWAY_PORT=tcp://…"""
    assert only("Service")["metadata"]["name"].upper() + "_PORT" in setting_env_names()
    with pytest.raises(SettingsError, match="GATEWAY_PORT"):
        Settings.from_env({"GATEWAY_PORT": "tcp://10.96.0.12:8000"})
    assert pod_spec()["enableServiceLinks"] is False


def test_grace_period_covers_prestop_drain_and_the_servers_shutdown() -> None:
    """The grace period covers preStop + drain + uvicorn's shutdown bound + NATS's drain."""
    settings = Settings.from_env(env_values())
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert pre_stop >= 3, "endpoints and proxies need a few seconds to forget the pod"
    assert grace >= settings.drain_s + pre_stop + 5
    server_bound = Gateway(settings, CollectorRegistry()).server.config.timeout_graceful_shutdown
    assert grace >= pre_stop + settings.drain_s + server_bound + 1


def test_container_is_locked_down() -> None:
    """uid 10001, read-only root (/tmp an emptyDir), no privileges, seccomp, no API token."""
    pod = pod_spec()
    effective = {**pod["securityContext"], **container()["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 10001
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective.get("privileged", False) is False
    assert effective["capabilities"] == {"drop": ["ALL"]}
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (mount,) = container()["volumeMounts"]
    assert mount["mountPath"] == "/tmp"  # noqa: S108 - a path in the container, not opened here
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_every_selector_selects_the_pods() -> None:
    """Every selector picks the gateway's pods, and the HPA scales this Deployment."""
    labels = pod_labels()
    spec = deployment()["spec"]
    assert selects(spec["selector"], labels)
    assert selects(only("Service")["spec"]["selector"], labels)
    assert selects(only("PodDisruptionBudget")["spec"]["selector"], labels)
    assert selects(only("PodMonitor")["spec"]["selector"], labels)
    constraints = pod_spec()["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {"kubernetes.io/hostname"}
    for constraint in constraints:
        assert selects(constraint["labelSelector"], labels)
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    target = only("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment()["metadata"]["name"])


def test_rollouts_and_disruptions_keep_capacity() -> None:
    """Rollouts surge first, disruptions and scale-downs take one pod at a time, HPA min 2."""
    spec = deployment()["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pdb = only("PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) >= 1
    hpa = only("HorizontalPodAutoscaler")["spec"]
    assert 2 <= hpa["minReplicas"] <= spec["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container()["resources"]["requests"]
    assert hpa["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 300}
    ], "each removed pod sends its clients elsewhere: one at a time"


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"write memory in Mi or Gi, got {quantity!r}"
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def test_memory_limit_holds_the_connection_cap_with_headroom() -> None:
    """Max connections x 40 KiB + 57 MiB fits in 75 % of the memory limit; 1 core per worker."""
    settings = Settings.from_env(env_values())
    resources = container()["resources"]
    limit = _mebibytes(resources["limits"]["memory"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    needed = BASELINE_MIB + settings.max_connections * PER_CONNECTION_KIB / 1024
    assert needed <= (1 - MEMORY_HEADROOM) * limit, f"{needed:.0f} MiB of {limit:.0f} MiB"
    assert resources["limits"]["cpu"] == str(settings.workers)
