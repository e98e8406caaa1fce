"""The dashboard and the alert rules against a real Prometheus scraping real gateways.

nats-server, gateways and a synthetic publisher run as child processes, one WebSocket
client per gateway reads frames (so delivery metrics move), and Debian's `prometheus`
scrapes every second with the repo's own prometheus.yml and alerts.yml, only its ports
rewritten to local ones. The gateway job discovers replicas by DNS as in compose: where
the machine allows it, Prometheus runs in a mount namespace whose /etc/resolv.conf names
a DNS server of the test, which answers `gateway-fleet` with two loopback addresses, one
gateway on each; elsewhere each DNS name becomes the static targets its answer would give,
labelled as DNS discovery labels them, so the relabelling runs either way.

The dashboard's NATS row reads prometheus-nats-exporter's metrics. No exporter runs here
(it is a Go binary with no Debian or PyPI package), so those queries are only parsed and
evaluated by the real Prometheus (an empty answer is fine); their metric names are pinned
from the exporter's source in test_deploy.py. Every gateway query must return data.

Debian's `prometheus-alertmanager` (where installed) runs with the repo's
alertmanager.yml, and Prometheus, with the repo's `alerting` section, delivers to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import websockets
import yaml

from gateway.natsserver import NatsServer
from test_deploy import (
    ALERTMANAGER_CONFIG,
    ALERTS,
    PROMETHEUS_CONFIG,
    dashboard_queries,
    load_yaml,
    reads_nats_exporter,
    rules,
    template_queries,
)

from conftest import GatewayProcess, seconds, wait_until

PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
# Debian names the binary prometheus-alertmanager; upstream releases, alertmanager.
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
UNSHARE = shutil.which("unshare")
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus is not installed (apt-get install -y prometheus)"
    ),
]

# Grafana's variables, as Grafana would expand them for a 1 s scrape interval and the
# defaults the dashboard opens with ("All" is ".+").
GRAFANA_VARIABLES = {
    "__rate_interval": "10s",
    "__interval": "1s",
    "job": "gateway",
    "instance": ".+",
    "nats_job": ".+",
    "stream": ".+",
}
# The compose ports the local processes stand in for.
GATEWAY_PORT, PROMETHEUS_PORT, ALERTMANAGER_PORT = 8000, 9090, 9093
# The test's DNS server: port 53 is fixed (resolv.conf cannot name another), the address
# is one no system resolver uses (systemd-resolved is 127.0.0.53).
DNS_HOST = "127.53.0.1"
# The fleet's replicas: one gateway per loopback address, all on one port, as compose
# replicas are one address each on one port.
REPLICA_HOSTS = ("127.0.0.2", "127.0.0.3")
# "by (... instance ...)": a query that draws one series per replica.
PER_REPLICA = re.compile(r"\bby\s*\([^)]*\binstance\b")


def free_port(*hosts: str) -> int:
    """A port free on every one of `hosts` (bound on all at once, then released)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(socket.socket())
        first.bind((hosts[0], 0))
        port = int(first.getsockname()[1])
        for host in hosts[1:]:
            stack.enter_context(socket.socket()).bind((host, port))
        return port


def expand(expr: str) -> str:
    """Replace Grafana's `$var` / `${var}` with the values GRAFANA_VARIABLES gives."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m[1]], expr)


def local_config(
    zone: Mapping[str, Sequence[str]], ports: Mapping[int, int], *, dns: bool
) -> dict[str, Any]:
    """The repo's prometheus.yml, run here: 1 s intervals, absolute rule files, local ports.

    `ports` maps a port of the compose stack to the local port standing in for it; jobs on
    other ports (the NATS exporters, HAProxy) are dropped, and so are the alertmanagers
    when none stands in for them. Static targets move to 127.0.0.1. DNS-discovered jobs
    keep their names: with `dns` the test's DNS server answers them from `zone` (name ->
    addresses); without, each name becomes the static targets its addresses would give,
    labelled `__meta_dns_name` as discovery labels them.
    """
    config: dict[str, Any] = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    managers = [
        f"127.0.0.1:{ports[int(target.rpartition(':')[2])]}"
        for manager in config.pop("alerting")["alertmanagers"]
        for static in manager.pop("static_configs")
        for target in static["targets"]
        if int(target.rpartition(":")[2]) in ports
    ]
    if managers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": managers}]}]}
    jobs = []
    for job in config["scrape_configs"]:
        discovered = job.pop("dns_sd_configs", [])
        static = job.pop("static_configs", [])
        assert set(job) <= {"job_name", "relabel_configs"}, f"{job['job_name']}: update me"
        if discovered:
            assert all(c["type"] == "A" for c in discovered)
            if any(c["port"] not in ports for c in discovered):
                continue
            if dns:
                job["dns_sd_configs"] = [
                    {**c, "port": ports[c["port"]], "refresh_interval": "1s"} for c in discovered
                ]
            else:
                job["static_configs"] = [
                    {
                        "targets": [f"{address}:{ports[c['port']]}" for address in zone[name]],
                        "labels": {"__meta_dns_name": name},
                    }
                    for c in discovered
                    for name in c["names"]
                    if name in zone
                ]
        else:
            targets = [t for c in static for t in c["targets"]]
            if any(int(t.rpartition(":")[2]) not in ports for t in targets):
                continue
            job["static_configs"] = [
                {"targets": [f"127.0.0.1:{ports[int(t.rpartition(':')[2])]}" for t in targets]}
            ]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def question_name(query: bytes) -> tuple[str, int]:
    """The name a DNS query asks about, and the offset just past it."""
    labels, end = [], 12  # after the header
    while length := query[end]:
        labels.append(query[end + 1 : end + 1 + length].decode().lower())
        end += 1 + length
    return ".".join(labels), end + 1


def dns_answer(query: bytes, zone: Mapping[str, Sequence[str]]) -> bytes:
    """The reply to one DNS query: the zone's A records for the name, else NXDOMAIN."""
    ident, flags = struct.unpack(">HH", query[:4])
    name, end = question_name(query)
    (qtype,) = struct.unpack(">H", query[end : end + 2])
    question = query[12 : end + 4]  # name, type, class
    addresses = zone.get(name)
    records = (addresses or []) if qtype == 1 else []  # type A only
    rcode = 3 if addresses is None else 0  # NXDOMAIN: no such name at all
    # QR (a response) | AA (authoritative) | the query's RD bit | the rcode
    header = struct.pack(">HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, len(records), 0, 0)
    # Each answer: a pointer to the question's name, type A, class IN, TTL 0, 4 bytes.
    answers = b"".join(
        struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(a) for a in records
    )
    return header + question + answers


class DnsServer(asyncio.DatagramProtocol):
    """Answers DNS queries over UDP from a fixed zone (the part of Docker's embedded DNS
    that Prometheus' discovery sees)."""

    def __init__(self, zone: Mapping[str, Sequence[str]]) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # What create_datagram_endpoint passes (its class does not subclass the ABC in 3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.queries.append(question_name(data)[0])
        self.transport.sendto(dns_answer(data, self.zone), addr)


@contextlib.asynccontextmanager
async def dns_server(zone: Mapping[str, Sequence[str]]) -> AsyncIterator[DnsServer]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: DnsServer(zone), local_addr=(DNS_HOST, 53)
    )
    try:
        yield server
    finally:
        transport.close()


def dns_namespace_missing() -> str | None:
    """Why Prometheus cannot be given the test's DNS server here, or None if it can."""
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    probe = [UNSHARE, "--user", "--map-root-user", "--mount", "--", "true"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        return f"no user + mount namespace for Prometheus: {result.stderr.strip()}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((DNS_HOST, 53))
        except PermissionError:
            return "binding the test's DNS server to port 53 needs root or CAP_NET_BIND_SERVICE"
    return None


def with_resolver(args: list[str], resolv_conf: Path) -> list[str]:
    """`args` run in a user + mount namespace where `resolv_conf` is /etc/resolv.conf."""
    assert UNSHARE is not None
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    wrapper = [UNSHARE, "--user", "--map-root-user", "--mount", "--", "sh", "-c", script]
    return [*wrapper, str(resolv_conf), *args]


@contextlib.contextmanager
def child(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[Callable[[], None]]:
    """A child process logging to `log`; interrupted, then killed if it lingers, by PID.

    Yields a check that fails the test, with the log, if the process has exited.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

        def check_alive() -> None:
            if proc.poll() is not None:
                raise AssertionError(f"{Path(args[0]).name} exited:\n{log.read_text()}")

        try:
            yield check_alive
            check_alive()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
                try:
                    proc.wait(seconds(10))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.asynccontextmanager
async def reading_client(url: str) -> AsyncIterator[list[str]]:
    """A WebSocket client of `url` whose frames are appended to the yielded list."""
    frames: list[str] = []
    async with websockets.connect(url) as ws:

        async def read() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for frame in ws:
                    frames.append(str(frame))

        reader = asyncio.create_task(read())
        try:
            yield frames
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def query(http: httpx.AsyncClient, expr: str) -> list[Any]:
    """Instant query; any PromQL error fails the test with the expression."""
    response = await http.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}\n-> {body.get('error')}"
    return list(body["data"]["result"])


@contextlib.asynccontextmanager
async def prometheus(
    config: dict[str, Any],
    port: int,
    tmp_path: Path,
    resolv_conf: Path | None = None,
    flags: Sequence[str] = (),
) -> AsyncIterator[httpx.AsyncClient]:
    """Prometheus with `config` and `flags` on `port` (reading `resolv_conf` if given),
    once ready."""
    assert PROMETHEUS is not None
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    args = [
        PROMETHEUS,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        *flags,
    ]
    if resolv_conf is not None:
        args = with_resolver(args, resolv_conf)
    base_url = f"http://127.0.0.1:{port}"
    with child(args, tmp_path / "prometheus.log") as alive:
        async with httpx.AsyncClient(base_url=base_url, timeout=5, trust_env=False) as http:

            async def is_ready() -> bool:
                alive()  # a bad config or rule file stops it at once
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/-/ready")).status_code == 200
                return False

            await wait_until(is_ready, 20, "Prometheus to be ready")
            yield http


def has_data(http: httpx.AsyncClient, expr: str) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(await query(http, expand(expr)))

    return check


async def test_dashboard_and_alert_queries_work_against_real_prometheus(
    nats_server: NatsServer,
    gateway_process: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    """Every dashboard expression returns data; every alert rule evaluates cleanly."""
    env = {**os.environ, "NATS_URL": nats_server.url}
    gateway_port = gateway_process({"NATS_URL": nats_server.url}).wait_started()
    ports = {GATEWAY_PORT: gateway_port, PROMETHEUS_PORT: free_port("127.0.0.1")}
    config = local_config({"gateway": ["127.0.0.1"]}, ports, dns=False)
    publisher_args = [sys.executable, "-m", "gateway", "publish", "--rate", "20"]
    with child(publisher_args, tmp_path / "publisher.log", env):
        async with (
            reading_client(f"ws://127.0.0.1:{gateway_port}/ws/stream") as frames,
            prometheus(config, ports[PROMETHEUS_PORT], tmp_path) as http,
        ):
            await wait_until(lambda: len(frames) >= 5, 15, "the client to receive frames")
            await wait_until(
                has_data(http, 'count_over_time(up{job="gateway"}[1m]) >= 5'),
                30,
                "five scrapes of the gateway",
            )
            queries = dashboard_queries() + template_queries()
            nats = [(where, expr) for where, expr in queries if reads_nats_exporter(expr)]
            assert nats, "the NATS row"
            for where, expr in queries:
                if (where, expr) in nats:
                    await query(http, expand(expr))  # parses and evaluates: no exporter here
                    continue
                # Rates need two samples in their window: allow a few more scrapes.
                await wait_until(has_data(http, expr), 10, f"data for {where}: {expr}")

            for rule in rules():
                await query(http, rule["expr"])  # parses and evaluates; need not fire

            async def rules_evaluated() -> bool:
                groups = (await http.get("/api/v1/rules")).json()["data"]["groups"]
                loaded = [r for g in groups if g["file"] == str(ALERTS) for r in g["rules"]]
                assert len(loaded) == len(rules()), "Prometheus did not load alerts.yml"
                for rule in loaded:
                    assert rule["health"] != "err", f"{rule['name']}: {rule.get('lastError')}"
                return all(rule["health"] == "ok" for rule in loaded)

            await wait_until(rules_evaluated, 10, "every alert rule to be evaluated")


@pytest.mark.parametrize("discovery", ["dns", "static"])
async def test_prometheus_finds_every_replica_and_panels_split_by_replica(
    discovery: str,
    nats_server: NatsServer,
    gateway_process: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    """Two replicas behind one DNS name: two `gateway` targets up, labelled with their
    service; each per-replica panel draws one series per replica; "Ready replicas" says 2."""
    if discovery == "dns" and (reason := dns_namespace_missing()):
        pytest.skip(reason)
    env = {**os.environ, "NATS_URL": nats_server.url}
    port = free_port(*REPLICA_HOSTS)
    # One environment, as compose gives its replicas; each replica has its own address.
    replicas = [
        gateway_process({"NATS_URL": nats_server.url, "GATEWAY_HOST": h, "GATEWAY_PORT": str(port)})
        for h in REPLICA_HOSTS
    ]
    assert all(replica.wait_started() == port for replica in replicas)
    ports = {GATEWAY_PORT: port, PROMETHEUS_PORT: free_port("127.0.0.1")}
    # `gateway` (the single-gateway service) does not resolve, as in the fleet-only case.
    zone = {"gateway-fleet": list(REPLICA_HOSTS)}
    config = local_config(zone, ports, dns=discovery == "dns")
    resolv_conf = None
    if discovery == "dns":
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text(f"nameserver {DNS_HOST}\n")
    instances = {f"{host}:{port}" for host in REPLICA_HOSTS}
    publisher_args = [sys.executable, "-m", "gateway", "publish", "--rate", "20"]
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(child(publisher_args, tmp_path / "publisher.log", env))
        clients = [
            await stack.enter_async_context(reading_client(f"ws://{i}/ws/stream"))
            for i in sorted(instances)
        ]
        dns = await stack.enter_async_context(dns_server(zone)) if resolv_conf else None
        http = await stack.enter_async_context(
            prometheus(config, ports[PROMETHEUS_PORT], tmp_path, resolv_conf)
        )
        await wait_until(lambda: all(len(f) >= 5 for f in clients), 15, "frames on every replica")

        async def both_targets_up() -> bool:
            body = (await http.get("/api/v1/targets", params={"state": "active"})).json()
            targets = [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == "gateway"]
            found = {t["labels"]["instance"]: t for t in targets}
            assert set(found) <= instances, f"unexpected targets {sorted(found)}"
            for target in targets:
                assert target["labels"]["service"] == "gateway-fleet", target["labels"]
            return set(found) == instances and all(t["health"] == "up" for t in targets)

        await wait_until(both_targets_up, 20, "both replicas as `gateway` targets, up")
        if dns is not None:  # found through DNS, not some other way
            assert {"gateway", "gateway-fleet"} <= set(dns.queries), dns.queries
        await wait_until(
            has_data(
                http, f'count(count_over_time(up{{job="gateway"}}[1m]) >= 5) == {len(instances)}'
            ),
            30,
            "five scrapes of each replica",
        )

        per_replica = [(w, e) for w, e in dashboard_queries() if PER_REPLICA.search(e)]
        assert len(per_replica) >= 5, per_replica
        for where, expr in per_replica:

            async def one_series_per_replica(expr: str = expr) -> bool:
                series = await query(http, expand(expr))
                return sorted(s["metric"]["instance"] for s in series) == sorted(instances)

            await wait_until(one_series_per_replica, 10, f"one series per replica: {where}")

        (ready,) = [e for w, e in dashboard_queries() if w == "Ready replicas" and "up{" in e]
        (result,) = await query(http, expand(ready))
        assert float(result["value"][1]) == len(REPLICA_HOSTS)

        async def replicas_recorded() -> bool:
            ready = await query(http, 'gateway:replicas_ready{service="gateway-fleet"}')
            return [float(s["value"][1]) for s in ready] == [len(REPLICA_HOSTS)]

        # The recording rule sees both replicas ready (up, and connected to NATS).
        await wait_until(replicas_recorded, 10, "gateway:replicas_ready to count 2 replicas")


# Alerts that fire at once, named like the real ones, to drive the real Alertmanager.
SYNTHETIC_ALERTS = """
groups:
  - name: synthetic
    rules:
      - alert: GatewayDown
        expr: vector(1)
        labels: {severity: critical, instance: "gw-x:8000", service: gateway}
      - alert: GatewayStreamStale
        expr: vector(1)
        labels: {severity: critical, instance: "gw-x:8000", service: gateway}
      - alert: GatewayStreamStale
        expr: vector(1)
        labels: {severity: critical, instance: "gw-y:8000", service: gateway}
"""


@pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="alertmanager is not installed (apt-get install -y prometheus-alertmanager)",
)
async def test_prometheus_delivers_alerts_to_the_repo_alertmanager(tmp_path: Path) -> None:
    """Prometheus, with the repo's `alerting` section, sends firing alerts to a real
    Alertmanager running the repo's alertmanager.yml: shown for the UI-only receiver, and a
    replica's GatewayDown inhibits that replica's other alerts (not another replica's)."""
    assert ALERTMANAGER is not None
    port = free_port("127.0.0.1")
    ports = {PROMETHEUS_PORT: free_port("127.0.0.1"), ALERTMANAGER_PORT: port}
    config = local_config({}, ports, dns=False)
    synthetic = tmp_path / "synthetic.yml"
    synthetic.write_text(SYNTHETIC_ALERTS)
    config["rule_files"].append(str(synthetic))
    (manager,) = config["alerting"]["alertmanagers"]
    assert manager["static_configs"] == [{"targets": [f"127.0.0.1:{port}"]}]
    args = [
        ALERTMANAGER,
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--storage.path={tmp_path / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port: one instance, loopback only
        "--log.level=warn",
    ]
    base_url = f"http://127.0.0.1:{port}"
    with child(args, tmp_path / "alertmanager.log") as alive:
        async with httpx.AsyncClient(base_url=base_url, timeout=5, trust_env=False) as am:

            async def am_ready() -> bool:
                alive()
                with contextlib.suppress(httpx.TransportError):
                    return (await am.get("/-/ready")).status_code == 200
                return False

            await wait_until(am_ready, 20, "Alertmanager to be ready")
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            # Alerts that fire before the Alertmanager is discovered are dropped and sent
            # again after the resend delay (1 minute by default): make that 1 s.
            resend = ["--rules.alert.resend-delay=1s"]
            async with prometheus(config, ports[PROMETHEUS_PORT], prom_dir, flags=resend) as http:

                async def delivered() -> list[dict[str, Any]] | None:
                    alive()
                    found = (await am.get("/api/v2/alerts")).json()
                    return found if len(found) == 3 else None

                await wait_until(delivered, 20, "three alerts in Alertmanager")
                found = await delivered()
                assert found is not None
                state = {
                    (a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"]
                    for a in found
                }
                assert state == {
                    ("GatewayDown", "gw-x:8000"): "active",
                    ("GatewayStreamStale", "gw-x:8000"): "suppressed",  # inhibited
                    ("GatewayStreamStale", "gw-y:8000"): "active",
                }
                for alert in found:
                    assert [r["name"] for r in alert["receivers"]] == ["ui-only"]

                body = (await http.get("/api/v1/alertmanagers")).json()["data"]
                urls = [m["url"] for m in body["activeAlertmanagers"]]
                assert urls == [f"{base_url}/api/v2/alerts"]
                await wait_until(
                    has_data(http, 'up{job="alertmanager"} == 1'), 10, "Alertmanager scraped"
                )
