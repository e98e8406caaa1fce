"""The dashboard and the alert rules against a real Prometheus scraping a real gateway.

nats-server, a gateway and a synthetic publisher run as child processes, one WebSocket
client reads frames (so delivery metrics move), and Debian's `prometheus` scrapes the
gateway every second with the repo's own prometheus.yml, its targets rewritten to local
ports, and the repo's alerts.yml. Then every PromQL expression of the dashboard must return
data and every alert expression must evaluate without error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from gateway.natsserver import NatsServer
from test_deploy import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard_queries,
    load_yaml,
    template_queries,
)

from conftest import GatewayProcess, seconds

PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (apt-get install -y prometheus)"
)

# Grafana's variables, as Grafana would expand them for a 1 s scrape interval.
GRAFANA_VARIABLES = {"__rate_interval": "10s", "__interval": "1s", "instance": ".+"}


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Call `check` until it returns true; fail after `timeout` (scaled) seconds."""
    deadline = time.monotonic() + seconds(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds(timeout):.0f}s waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def expand(expr: str) -> str:
    """Replace Grafana's `$var` / `${var}` with the values GRAFANA_VARIABLES gives."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m[1]], expr)


def local_config(targets: dict[str, str]) -> dict[str, Any]:
    """The repo's prometheus.yml with 1 s intervals, local targets and absolute rule files.

    Jobs with no local counterpart (the NATS exporter) are dropped.
    """
    config = load_yaml(PROMETHEUS_CONFIG)
    assert set(targets) <= {job["job_name"] for job in config["scrape_configs"]}
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    config["scrape_configs"] = [
        {**job, "static_configs": [{"targets": [targets[job["job_name"]]]}]}
        for job in config["scrape_configs"]
        if job["job_name"] in targets
    ]
    return config


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


@contextlib.contextmanager
def reading_client(port: int) -> Iterator[list[str]]:
    """A WebSocket client of /ws/stream whose frames are appended to the yielded list."""
    frames: list[str] = []
    with connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:

        def read() -> None:
            with contextlib.suppress(Exception):  # the socket closes at teardown
                for frame in ws:
                    frames.append(str(frame))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        yield frames
        ws.close()
        reader.join(seconds(5))


def query(http: httpx.Client, expr: str) -> list[Any]:
    """Instant query; any PromQL error fails the test with the expression."""
    response = http.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}\n-> {body.get('error')}"
    return list(body["data"]["result"])


def test_dashboard_and_alert_queries_work_against_real_prometheus(
    nats_server: NatsServer,
    gateway_process: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    """Every dashboard expression returns data; every alert rule evaluates cleanly."""
    assert PROMETHEUS is not None
    env = {**os.environ, "NATS_URL": nats_server.url}
    gateway_port = gateway_process({"NATS_URL": nats_server.url}).wait_started()
    prometheus_port = free_port()
    config = local_config(
        {"gateway": f"127.0.0.1:{gateway_port}", "prometheus": f"127.0.0.1:{prometheus_port}"}
    )
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    prometheus_args = [
        PROMETHEUS,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--log.level=warn",
    ]
    publisher_args = [sys.executable, "-m", "gateway", "publish", "--rate", "20"]
    with (
        child(publisher_args, tmp_path / "publisher.log", env),
        reading_client(gateway_port) as frames,
        child(prometheus_args, tmp_path / "prometheus.log") as prometheus_alive,
        httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=5) as http,
    ):
        poll(lambda: len(frames) >= 5, 15, "the client to receive frames")

        def is_ready() -> bool:
            prometheus_alive()  # a bad config or rule file stops it at once
            with contextlib.suppress(httpx.TransportError):
                return http.get("/-/ready").status_code == 200
            return False

        poll(is_ready, 20, "Prometheus to be ready")
        poll(
            lambda: bool(query(http, 'count_over_time(up{job="gateway"}[1m]) >= 5')),
            30,
            "five scrapes of the gateway",
        )

        def has_data(expr: str) -> Callable[[], bool]:
            return lambda: bool(query(http, expand(expr)))

        for where, expr in dashboard_queries() + template_queries():
            # Rates need two samples in their window: allow a few more scrapes.
            poll(has_data(expr), 10, f"data for {where}: {expr}")

        for rule in alert_rules():
            query(http, rule["expr"])  # parses and evaluates; need not fire

        def rules_evaluated() -> bool:
            groups = http.get("/api/v1/rules").json()["data"]["groups"]
            rules = [r for g in groups if g["file"] == str(ALERTS) for r in g["rules"]]
            assert len(rules) == len(alert_rules()), "Prometheus did not load alerts.yml"
            for rule in rules:
                assert rule["health"] != "err", f"{rule['name']}: {rule.get('lastError')}"
            return all(rule["health"] == "ok" for rule in rules)

        poll(rules_evaluated, 10, "every alert rule to be evaluated")
