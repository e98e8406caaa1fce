"""A gateway fleet on loopback: identical replicas behind a real HAProxy, and browser-like
followers that reconnect with backoff. Used by test_fleet.py.

HAProxy runs the compose fleet's own deploy/haproxy/haproxy.cfg; only what cannot be the
same on one machine is replaced: Docker's DNS discovery (`resolvers docker`,
`server-template`) by one static `server` line per replica port, and the bind addresses
by free loopback ports. Every tuning line (timeouts, health check, balance, retries) is
kept, so the tests measure the configuration that ships.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
import itertools
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats.errors
import websockets
from nats.js import JetStreamContext
from websockets.exceptions import InvalidHandshake

from natscluster import STREAM, free_ports

from conftest import GatewayProcess, publish_json, seconds, wait_until

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
FRONT_BIND, STATS_BIND = "bind :8080", "bind :8404"
SERVER_TEMPLATE = re.compile(r"^(\s*)server-template gw \d+ gateway-fleet:8000 (.*)$", re.M)
DNS_ONLY_OPTIONS = ("resolvers docker", "init-addr none")

# The README's reconnect rule (exponential backoff, full jitter), with the cap scaled down
# from 10 s to 2 s: a test run is a minute, not a day, and the gaps measured should be the
# fleet's, not one unlucky 10 s draw.
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.25, 2.0
MAX_ATTEMPTS = 200  # per follower: bounds the reconnect loop whatever happens
PUBLISH_HZ = 10.0
MAX_PUBLISHES = 20_000  # bounds the publisher (over half an hour at 10 Hz)
SHUTDOWN_DEADLINE_S = 20.0  # SIGTERM → exit: drain (2 s) + send timeout + NATS drain, with room


# --- HAProxy --------------------------------------------------------------------------


def haproxy_config(text: str, *, front: int, stats: int, backends: list[int]) -> str:
    """deploy/haproxy/haproxy.cfg for loopback: static servers, loopback binds, no DNS."""
    for needle in (FRONT_BIND, STATS_BIND):
        assert text.count(needle) == 1, f"haproxy.cfg has no single {needle!r} any more"
    text = text.replace(FRONT_BIND, f"bind 127.0.0.1:{front}")
    text = text.replace(STATS_BIND, f"bind 127.0.0.1:{stats}")
    matches = list(SERVER_TEMPLATE.finditer(text))
    assert len(matches) == 1, "haproxy.cfg has no single `server-template gw N gateway-fleet:8000`"
    (match,) = matches
    indent, options = match.group(1), match.group(2)
    for dns_only in DNS_ONLY_OPTIONS:
        assert dns_only in options, f"server-template lost {dns_only!r}"
        options = options.replace(dns_only, "")
    options = " ".join(options.split())  # e.g. "check"
    servers = "\n".join(
        f"{indent}server gw{i} 127.0.0.1:{port} {options}" for i, port in enumerate(backends, 1)
    )
    text = text[: match.start()] + servers + text[match.end() :]
    return _without_section(text, "resolvers docker")


def _without_section(text: str, header: str) -> str:
    """The config without one section: its header line up to the next section header."""
    lines, kept, inside = text.splitlines(), [], False
    for line in lines:
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            inside = line.strip() == header  # a section header
        if not inside:
            kept.append(line)
    assert len(kept) < len(lines), f"haproxy.cfg has no section {header!r}"
    return "\n".join(kept) + "\n"


class HAProxy:
    """An haproxy process in the foreground (-db) running a generated config."""

    def __init__(self, workdir: Path, backends: list[int]) -> None:
        self.front, self.stats = free_ports(2)
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(
            haproxy_config(
                HAPROXY_CFG.read_text(), front=self.front, stats=self.stats, backends=backends
            )
        )
        self.log_path = workdir / "haproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.front}/ws/stream"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        assert HAPROXY is not None, "haproxy is not installed"
        check = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(self.cfg)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, f"generated haproxy.cfg invalid:\n{check.stderr}"
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT
            )  # -db: in the foreground, so this PID is HAProxy itself

    def stop(self) -> None:
        """Stop it (by its PID) and wait. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # HAProxy's hard stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def server_states(self, http: httpx.AsyncClient) -> dict[str, str]:
        """Each backend server's state ("UP", "DOWN", "UP 1/2", ...) from the stats CSV."""
        try:
            response = await http.get(f"http://127.0.0.1:{self.stats}/stats;csv")
        except httpx.TransportError:
            return {}
        rows = csv.DictReader(io.StringIO(response.text.removeprefix("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "gateway_fleet" and row["svname"] not in ("FRONTEND", "BACKEND")
        }


# --- The replicas ---------------------------------------------------------------------


async def is_ready(http: httpx.AsyncClient, port: int) -> bool:
    try:
        return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def health(http: httpx.AsyncClient, port: int) -> dict[str, object]:
    doc = (await http.get(f"http://127.0.0.1:{port}/health")).json()
    assert isinstance(doc, dict)
    return doc


@dataclass
class Fleet:
    """Identical gateway replicas, each on a port of its own kept across restarts, so the
    HAProxy config never changes; HAProxy in front of them."""

    start_process: Callable[[Mapping[str, str]], GatewayProcess]
    env: Mapping[str, str]
    ports: list[int]
    haproxy: HAProxy
    http: httpx.AsyncClient
    procs: list[GatewayProcess] = field(default_factory=list)

    async def start_replica(self, i: int) -> GatewayProcess:
        """Start replica `i` on its port (the same environment for all but the port)."""
        proc = self.start_process({**self.env, "GATEWAY_PORT": str(self.ports[i])})
        await asyncio.to_thread(proc.wait_started, 20)  # a thread: followers keep running
        return proc

    async def in_rotation(self, i: int) -> bool:
        return (await self.haproxy.server_states(self.http)).get(f"gw{i + 1}") == "UP"

    async def wait_serving(self, i: int, timeout: float = 30) -> None:
        """Until replica `i` is ready and HAProxy sends clients to it."""
        port = self.ports[i]
        await wait_until(lambda: is_ready(self.http, port), timeout, f"replica {i} /ready")
        try:
            await wait_until(lambda: self.in_rotation(i), timeout, f"replica {i} in rotation")
        except AssertionError as exc:
            states = await self.haproxy.server_states(self.http)
            raise AssertionError(f"{exc}: {states}\n{self.haproxy.log[-3000:]}") from None

    async def restart(self, i: int) -> None:
        """SIGTERM replica `i` (it must exit 0), start it again, wait until it serves."""
        old = self.procs[i]
        old.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(old.wait_exit, SHUTDOWN_DEADLINE_S)
        assert code == 0, f"replica {i} exited {code} on SIGTERM:\n{old.output}"
        self.procs[i] = await self.start_replica(i)
        await self.wait_serving(i, timeout=45)

    async def consumers(self) -> list[str]:
        """The consumer each replica says it uses (`/health` "consumer")."""
        names = []
        for port in self.ports:
            doc = await health(self.http, port)
            assert "consumer" in doc, f"/health has no 'consumer': {doc}"
            assert isinstance(doc["consumer"], str), f"replica not subscribed: {doc}"
            names.append(doc["consumer"])
        return names


@contextlib.asynccontextmanager
async def running_fleet(
    start_process: Callable[[Mapping[str, str]], GatewayProcess],
    env: Mapping[str, str],
    workdir: Path,
    size: int = 3,
) -> AsyncIterator[Fleet]:
    """`size` identical replicas serving behind HAProxy (replicas are killed by the
    `gateway_process` fixture, HAProxy here)."""
    ports = free_ports(size)
    haproxy = HAProxy(workdir, ports)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
        fleet = Fleet(start_process, env, ports, haproxy, http)
        # One after another: identical replicas racing for their first consumer name at
        # the same instant is a test of its own (test_fleet's first test), not this setup.
        for i in range(size):
            fleet.procs.append(await fleet.start_replica(i))
            await wait_until(lambda i=i: is_ready(http, ports[i]), 30, f"replica {i} /ready")
        haproxy.start()
        try:
            for i in range(size):
                await fleet.wait_serving(i)
            yield fleet
        finally:
            haproxy.stop()


# --- Clients and the publisher --------------------------------------------------------


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait until they are done. Cancelled again while one is not: a
    cancellation that lands as a library's `wait_for` completes can be swallowed (CPython
    gh-86296, as in the relay), and the task would go on."""
    for _ in range(20):
        pending = [task for task in tasks if not task.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    raise AssertionError(f"tasks still running after 20 cancellations: {pending[:3]}")


@dataclass
class Frame:
    at: float
    """time.monotonic() of receipt."""
    n: int
    connection: int
    """Which of the follower's connections carried it (1, 2, ...)."""


@dataclass
class Follower:
    """A WebSocket client that reconnects like the README tells frontends to."""

    url: str
    frames: list[Frame] = field(default_factory=list)
    connections: int = 0
    closed_at: list[float] = field(default_factory=list)
    """When each connection ended (seen by this client)."""

    @property
    def last_n(self) -> int | None:
        return self.frames[-1].n if self.frames else None

    async def run(self) -> None:
        """Follow the stream until cancelled (or MAX_ATTEMPTS connections were tried)."""
        attempt = 0
        for _ in range(MAX_ATTEMPTS):
            try:
                async with websockets.connect(
                    self.url, proxy=None, open_timeout=seconds(5), close_timeout=1
                ) as ws:
                    self.connections += 1
                    attempt = 0
                    async for raw in ws:
                        n = json.loads(raw)["n"]
                        self.frames.append(Frame(time.monotonic(), n, self.connections))
                    self.closed_at.append(time.monotonic())
            except (OSError, TimeoutError, InvalidHandshake, websockets.ConnectionClosed):
                if self.connections > len(self.closed_at):  # the open connection broke
                    self.closed_at.append(time.monotonic())
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))

    def max_gap(self, until: float) -> float:
        """The longest time without a frame, from the first frame to `until`."""
        times = [f.at for f in self.frames if f.at <= until]
        assert times, "no frame at all"
        return max(b - a for a, b in itertools.pairwise([*times, until]))


@contextlib.asynccontextmanager
async def following(url: str, count: int) -> AsyncIterator[list[Follower]]:
    """`count` followers of `url`, each in its own task; cancelled and awaited on exit."""
    followers = [Follower(url) for _ in range(count)]
    tasks = [asyncio.create_task(f.run(), name=f"follower-{i}") for i, f in enumerate(followers)]
    try:
        yield followers
    finally:
        await cancel_all(tasks)
        crashed = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
        assert not crashed, f"followers crashed: {crashed[:3]}"


class Publisher:
    """Publishes {"n": 1}, {"n": 2}, ... at PUBLISH_HZ; `last` is the newest acknowledged."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.last = 0
        self.acked_at: list[float] = []
        self._stop = asyncio.Event()

    @property
    def longest_pause(self) -> float:
        """The longest time between two acknowledged publishes (a cluster electing a leader)."""
        return max((b - a for a, b in itertools.pairwise(self.acked_at)), default=0.0)

    async def run(self) -> None:
        n = 1
        for _ in range(MAX_PUBLISHES):
            if self._stop.is_set():
                return
            # While a cluster moves its leaders a publish can fail: retry the same n.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await publish_json(self.js, {"n": n}, timeout=1.0)
                self.last, n = n, n + 1
                self.acked_at.append(time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1 / PUBLISH_HZ)  # the rate

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def publishing(js: JetStreamContext) -> AsyncIterator[Publisher]:
    publisher = Publisher(js)
    task = asyncio.create_task(publisher.run(), name="publisher")
    try:
        yield publisher
    finally:
        publisher.stop()
        await task


async def everyone_has(followers: list[Follower], n: int) -> bool:
    return all(f.last_n == n for f in followers)


async def deliver_final(js: JetStreamContext, final: int, followers: list[Follower]) -> None:
    """Publish {"n": final} and wait until every follower holds it (the newest state)."""
    for _ in range(10):  # a cluster may still be electing a leader: retry a few times
        try:
            await publish_json(js, {"n": final}, timeout=2.0)
            break
        except (nats.errors.Error, TimeoutError):
            continue
    try:
        await wait_until(lambda: everyone_has(followers, final), 20, f"every client at n={final}")
    except AssertionError as exc:
        holding = collections.Counter(f.last_n for f in followers)
        raise AssertionError(f"{exc}; clients hold (n: count) {dict(holding)}") from None


def gap_report(followers: list[Follower], until: float) -> tuple[float, float]:
    """(worst, median) of the per-client longest gap without a frame."""
    gaps = [f.max_gap(until) for f in followers]
    return max(gaps), statistics.median(gaps)


class ConsumerWatch:
    """Polls the stream's consumers while a test runs; keeps the largest count seen."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.names: set[str] = set()
        self.most = 0

    async def poll(self) -> set[str] | None:
        try:
            infos = await self.js.consumers_info(STREAM)
        except (nats.errors.Error, TimeoutError):
            return None  # a cluster between leaders; the next poll tells
        self.names = {info.name for info in infos}
        self.most = max(self.most, len(self.names))
        return self.names

    async def run(self, period: float = 0.2, rounds: int = 3000) -> None:
        for _ in range(rounds):
            await self.poll()
            await asyncio.sleep(period)  # the polling rate, not a synchronisation


@contextlib.asynccontextmanager
async def watching_consumers(js: JetStreamContext) -> AsyncIterator[ConsumerWatch]:
    watch = ConsumerWatch(js)
    task = asyncio.create_task(watch.run(), name="consumer-watch")
    try:
        yield watch
    finally:
        await cancel_all([task])
