"""The real Dockerfile and the core of docker-compose.yml, built and run with podman.

The image is built from the Dockerfile as it is (`podman build --format docker`, which keeps
the HEALTHCHECK). Base images that cannot be pulled are replaced by stand-ins of the same
name (tests/containers.py). On GitHub the workflow builds the image with its layer cache and
hands it over in GATEWAY_TEST_IMAGE, with GATEWAY_CONTAINER_ENGINE=docker.

The compose core - nats, gateway, publisher, prometheus - is started as docker-compose.yml
defines it: images, commands, environment, ports, volumes, healthchecks, ulimits, init,
read_only, tmpfs, capabilities, security options, logging and the dependency order are read
from the file and translated to `podman run` (`compose_run_args`):

- services with `build: .` run the image built here (compose builds the same Dockerfile
  and tags it with their `image:` name);
- one podman network with DNS per run, each container joined under its service name, so
  `nats` and `gateway` resolve and Prometheus' DNS discovery finds the gateway;
- published ports keep their container port and bind 127.0.0.1, but the host port is left
  to the engine and read back (`podman port`): no clash with a stack already on 4222/8000;
- named volumes get the run's prefix and are removed afterwards; `./` paths become absolute;
- ulimits above this machine's hard limits become the host's own (raising a hard limit
  takes a privilege our VMs lack);
- `restart` is not translated (a crash must fail the test, not be restarted), and
  `depends_on` entries outside the core are skipped; a key the translation does not know
  fails the test (NOT_TRANSLATED lists the deliberate omissions);
- `service_healthy` is waited for by running the healthcheck (`podman healthcheck run`):
  without systemd podman runs no healthcheck timers.

Not exercised (no image reachable here, no stand-in): grafana, tempo, otel-collector (the
gateway's OTLP endpoint points at nothing: its spans are dropped, and its stop waits ~10 s
for the exporter), nats-exporter (Prometheus' `nats` job has no target), alertmanager
(Prometheus' alerts go nowhere), and the whole `fleet` profile (nats-1..3, gateway-fleet,
publisher-fleet, nats-exporter-fleet, haproxy). Their configuration is checked statically
by tests/test_deploy.py; the GitHub docker job starts the whole stack with the real images.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml

from containers import IMAGE_TMP, Engine, ensure_image
from gateway.natsserver import NatsServer
from natscluster import free_ports

from conftest import recv_json, seconds

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CORE = ("nats", "gateway", "publisher", "prometheus")
# The tag the tests build; services with `build: .` run it in place of their `image:` name
# (gateway:local), which other sessions on a shared engine may build and retag meanwhile.
IMAGE = "localhost/gateway:container-test"
UID = 10001  # the Dockerfile's service user

ENGINE = Engine()
pytestmark = [
    pytest.mark.container,
    # The first test also pays for the image: stand-ins (~1 min cold) and two builds.
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        ENGINE.exe is None,
        reason=f"{ENGINE.name} is not installed (.ci/run installs podman, runc, debootstrap)",
    ),
]


def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` until it is truthy; fail after `timeout` (scaled) seconds."""
    deadline = time.monotonic() + seconds(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds(timeout):.0f}s waiting for {what}")
        time.sleep(0.2)  # a poll period, not a synchronisation


def wait_healthy(container: str, timeout: float) -> None:
    until(lambda: ENGINE.healthy(container), timeout, f"{container}'s healthcheck to pass")


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own URL)
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def dockerfile_bases() -> list[str]:
    """The images the Dockerfile's stages start FROM (stage names excluded)."""
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"(?im)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text)
    stages = {stage.lower() for _, stage in froms if stage}
    return list(dict.fromkeys(ref for ref, _ in froms if ref.lower() not in stages))


@pytest.fixture(scope="module")
def image() -> str:
    """The gateway image, built from the Dockerfile (or handed over by CI)."""
    if prebuilt := os.environ.get("GATEWAY_TEST_IMAGE"):
        return prebuilt
    started = time.monotonic()
    origins = {ref: ensure_image(ENGINE, ref) for ref in dockerfile_bases()}
    prepared = time.monotonic() - started
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    args = ["--build-arg", f"VERSION={version}", "--build-arg", f"REVISION={revision()}"]
    # No --no-cache: it would leave a copy of every layer behind on each run. The first
    # build is as cold as the engine's layer cache is; the second shows the warm rebuild.
    first = ENGINE.build(IMAGE, ROOT, args=args)
    warm = ENGINE.build(IMAGE, ROOT, args=args)
    size = int(ENGINE.out("image", "inspect", "--format", "{{.Size}}", IMAGE))
    venv_kb = ENGINE.out("run", "--rm", IMAGE, "du", "-sk", "/app/.venv").split()[0]
    print(
        f"\n[container] bases {origins} ready in {prepared:.1f}s; build {first:.1f}s, "
        f"rebuild (warm) {warm:.1f}s; image {size / 1e6:.0f} MB, venv {int(venv_kb) / 1024:.0f} MiB"
    )
    return IMAGE


def revision() -> str:
    """The commit being tested, as `git` knows it ("unknown" outside a checkout)."""
    git = shutil.which("git") or "git"
    done = subprocess.run([git, "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.stdout.decode().strip() if done.returncode == 0 else "unknown"


@pytest.fixture(scope="module")
def loopback_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server on loopback for the module's gateway containers (host network)."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def start_gateway(image: str, loopback_nats: NatsServer) -> Iterator[Callable[[], tuple[str, int]]]:
    """Start the image as an operator would harden it: read-only root, tmpfs /tmp, host
    network to reach the loopback nats-server; (name, port). Removed at teardown."""
    names: list[str] = []

    def start() -> tuple[str, int]:
        (port,) = free_ports(1)
        name = f"gateway-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        env = {"NATS_URL": loopback_nats.url, "GATEWAY_PORT": str(port)}
        options = ["--read-only", "--tmpfs", IMAGE_TMP, "--network", "host"]
        ENGINE("run", "--detach", "--name", name, *options, *env_args(env), image)
        try:
            until(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, 30, "/health")
        except AssertionError as exc:
            logs = ENGINE("logs", name, check=False)
            raise AssertionError(f"{exc}\n{logs.stdout}{logs.stderr}") from None
        return name, port

    yield start
    ENGINE.remove(*names)


def env_args(env: dict[str, Any]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]


def test_image_serves_health(start_gateway: Callable[[], tuple[str, int]]) -> None:
    """The image serves /health with status 200 and its own HEALTHCHECK passes."""
    name, port = start_gateway()
    status, body = http_get(f"http://127.0.0.1:{port}/health")
    assert status == 200
    assert json.loads(body)["service"] == "gateway"
    wait_healthy(name, 15)


def test_image_runs_as_uid_10001_on_a_read_only_root(
    start_gateway: Callable[[], tuple[str, int]],
) -> None:
    """The gateway process runs as uid 10001 and serves with a read-only root filesystem."""
    name, _ = start_gateway()
    status = Path(f"/proc/{ENGINE.pid(name)}/status").read_text()
    uids = re.search(r"(?m)^Uid:\s+(.*)$", status)
    assert uids is not None
    assert set(uids[1].split()) == {str(UID)}, "real, effective, saved and fs uid"
    write = ENGINE("exec", name, "touch", "/app/probe", check=False)
    assert "Read-only file system" in write.stderr


@pytest.mark.anyio
async def test_stop_closes_clients_1001_and_exits_0(
    start_gateway: Callable[[], tuple[str, int]],
) -> None:
    """`podman stop` (SIGTERM) closes a connected client with 1001; the container exits 0
    within the 10 s grace period."""
    name, port = start_gateway()
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:
        started = time.monotonic()
        # In a thread: `stop` returns once the container has exited, and meanwhile this
        # client must answer the gateway's closing handshake.
        stopping = asyncio.create_task(
            asyncio.to_thread(ENGINE, "stop", "--time", "10", name, timeout=30, check=False)
        )
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), seconds(15))  # no publisher: nothing else comes
        stop = await stopping
    elapsed = time.monotonic() - started
    assert stop.returncode == 0, stop.stderr
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert ENGINE.out("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
    assert elapsed < 10, f"the container took {elapsed:.1f}s to stop"


def test_image_carries_only_what_serve_needs(image: str) -> None:
    """The runtime venv has the server's packages and none of the dev, load or demo ones
    (no nats-server binary, no pytest, no uvloop or watchfiles from uvicorn[standard])."""
    wanted = ("uvicorn", "httptools", "websockets", "litestar", "nats", "msgspec")
    # (pyyaml stays: litestar itself requires it.)
    unwanted = ("pytest", "uvloop", "watchfiles", "dotenv", "locust", "picows")
    probe = "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m)])"
    found = ENGINE.out("run", "--rm", image, "python", "-c", probe, *wanted, *unwanted).split()
    assert found == list(wanted)
    binaries = ENGINE.out("run", "--rm", image, "ls", "/app/.venv/bin").split()
    assert "nats-server" not in binaries


def test_image_carries_oci_labels(image: str) -> None:
    """The image says which version and revision it was built from."""
    labels = json.loads(
        ENGINE.out("image", "inspect", "--format", "{{json .Config.Labels}}", image)
    )
    for key in ("version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert "org.opencontainers.image.source" in labels


# --- the compose core ------------------------------------------------------------------------


# Compose keys with no `podman run` counterpart here, and why. Any other key the core
# services gain and compose_run_args does not know fails the test: teach it, or list it here.
NOT_TRANSLATED = {
    "restart": "a crash must fail the test, not be restarted",
    "depends_on": "the start order and the waits (compose_core) follow it",
    "profiles": "the core services have none",
}
TRANSLATED = {"image", "build", "command", "environment", "ports", "volumes", "ulimits",
              "stop_grace_period", "healthcheck", "init", "read_only", "tmpfs", "cap_drop",
              "cap_add", "security_opt", "logging"}  # fmt: skip


def compose_run_args(name: str, project: str, built: str) -> list[str]:
    """`podman run` arguments for compose service `name`, with `built` the image of the
    Dockerfile (see the module docstring)."""
    service = COMPOSE["services"][name]
    unknown = set(service) - TRANSLATED - set(NOT_TRANSLATED)
    assert not unknown, f"compose_run_args cannot translate {name}'s {sorted(unknown)}"
    args = ["--detach", "--name", f"{project}-{name}", "--network", project]
    args += ["--network-alias", name]
    if service.get("init"):
        args.append("--init")
    if service.get("read_only"):
        args.append("--read-only")
    args += [f"--tmpfs={mount}" for mount in service.get("tmpfs", [])]
    args += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    args += [f"--cap-add={cap}" for cap in service.get("cap_add", [])]
    args += [f"--security-opt={option}" for option in service.get("security_opt", [])]
    if logging := service.get("logging"):
        args.append(f"--log-driver={logging['driver']}")
        args += [f"--log-opt={key}={value}" for key, value in logging.get("options", {}).items()]
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    args += env_args(environment)
    for port in service.get("ports", []):
        host_ip, _, container_port = str(port).split(":")
        args += ["--publish", f"{host_ip}::{container_port}"]  # the engine picks the host port
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        source = str(ROOT / source) if source.startswith(".") else f"{project}-{source}"
        args += ["--volume", ":".join([source, target, *mode])]
    args += ulimit_args(service.get("ulimits", {}))
    if grace := service.get("stop_grace_period"):
        args += ["--stop-timeout", str(int(grace.removesuffix("s")))]
    args += healthcheck_args(service.get("healthcheck"))
    image = built if "build" in service else service["image"]
    return [*args, image, *service.get("command", [])]


def ulimit_args(ulimits: dict[str, dict[str, int]]) -> list[str]:
    """The service's ulimits, or this machine's own where they exceed its hard limits:
    raising a hard limit takes a privilege our VMs do not grant (nofile 65536 against a
    hard limit of 20000 is refused)."""
    limits = {name: (int(value["soft"]), int(value["hard"])) for name, value in ulimits.items()}
    if all(hard <= host_hard_limit(name) for name, (_, hard) in limits.items()):
        return [f"--ulimit={name}={soft}:{hard}" for name, (soft, hard) in limits.items()]
    print(f"\n[container] ulimits {limits} exceed this machine's: the container gets the host's")
    return ["--ulimit", "host"] if ENGINE.name == "podman" else []


def host_hard_limit(name: str) -> int:
    hard = resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))[1]
    return sys.maxsize if hard == resource.RLIM_INFINITY else hard


def healthcheck_args(check: dict[str, Any] | None) -> list[str]:
    if check is None:
        return []  # the image's own HEALTHCHECK
    if check.get("disable"):
        return ["--no-healthcheck"]
    kind, *command = check["test"]
    if kind == "CMD":  # exec form: podman takes it as JSON; docker's flag is always a shell
        command = [json.dumps(command) if ENGINE.name == "podman" else shlex.join(command)]
    args = ["--health-cmd", command[0]]
    for key in ("interval", "timeout", "retries", "start_period"):
        if key in check:
            args += [f"--health-{key.replace('_', '-')}", str(check[key])]
    return args


def start_order(services: tuple[str, ...]) -> list[str]:
    """`services` with every dependency before its dependents."""
    order: list[str] = []

    def visit(name: str) -> None:
        for dependency in COMPOSE["services"][name].get("depends_on", {}):
            if dependency in services and dependency not in order:
                visit(dependency)
        if name not in order:
            order.append(name)

    for name in services:
        visit(name)
    return order


@pytest.fixture
def compose_core(image: str) -> Iterator[str]:
    """nats, gateway, publisher and prometheus up, as `docker compose up` starts them;
    yields the project name (containers are `<project>-<service>`)."""
    project = f"gwtest-{uuid.uuid4().hex[:8]}"
    for name in CORE:
        if "build" not in COMPOSE["services"][name]:
            ensure_image(ENGINE, COMPOSE["services"][name]["image"])
    ENGINE("network", "create", project)
    try:
        for name in start_order(CORE):
            for dependency, rule in COMPOSE["services"][name].get("depends_on", {}).items():
                if dependency in CORE and rule["condition"] == "service_healthy":
                    wait_healthy(f"{project}-{dependency}", 60)
            ENGINE("run", *compose_run_args(name, project, image))
        yield project
    finally:
        ENGINE.remove(*(f"{project}-{name}" for name in CORE))
        ENGINE("network", "rm", project, check=False)
        for name in CORE:
            for volume in COMPOSE["services"][name].get("volumes", []):
                if not volume.startswith("."):  # a named volume, see compose_run_args
                    ENGINE("volume", "rm", f"{project}-{volume.split(':')[0]}", check=False)


@pytest.mark.anyio
async def test_compose_core_relays_publisher_to_clients_and_prometheus(compose_core: str) -> None:
    """With the compose core up, the publisher's messages reach a WebSocket client of the
    gateway container, its healthcheck passes, and Prometheus scrapes it (up == 1)."""
    gateway = f"{compose_core}-gateway"
    wait_healthy(gateway, 60)
    port = ENGINE.host_port(gateway, 8000)
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:
        first, second = await recv_json(ws, 30), await recv_json(ws, 5)
    assert isinstance(first["seq"], int)
    assert isinstance(second["seq"], int)
    assert second["seq"] > first["seq"], "frames arrive live, in order"

    prometheus = f"{compose_core}-prometheus"
    wait_healthy(prometheus, 60)
    query = f"http://127.0.0.1:{ENGINE.host_port(prometheus, 9090)}/api/v1/query?query="

    def gateway_up() -> bool:
        status, body = http_get(query + "up%7Bjob%3D%22gateway%22%7D")
        results = json.loads(body)["data"]["result"] if status == 200 else []
        return [r["value"][1] for r in results] == ["1"]

    until(gateway_up, 60, 'Prometheus to scrape the gateway (up{job="gateway"} == 1)')
