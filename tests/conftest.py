"""Shared fixtures: real nats-server processes, real gateways on real sockets.

Time in tests is events and deadlines: `wait_until` polls a condition until a deadline
scaled by GATEWAY_TEST_TIMEOUT_FACTOR (raise it on a slow CI machine). Nothing sleeps
to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest
import websockets
from nats.js import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer
from gateway.server import Gateway
from gateway.settings import Settings

if TYPE_CHECKING:
    from natscluster import Node

TIMEOUT_FACTOR = float(os.environ.get("GATEWAY_TEST_TIMEOUT_FACTOR", "1"))

# SPEC "Metrics": the contract names (histograms by their base name).
CONTRACT_METRICS = frozenset(
    {
        "gateway_messages_received_total",
        "gateway_messages_invalid_total",
        "gateway_messages_sent_total",
        "gateway_messages_conflated_total",
        "gateway_send_failures_total",
        "gateway_connections_active",
        "gateway_connections_total",
        "gateway_connections_rejected_total",
        "gateway_nats_connected",
        "gateway_consumer_lag",
        "gateway_last_message_timestamp_seconds",
        "gateway_broadcast_duration_seconds",
        "gateway_delivery_lag_seconds",
    }
)
HISTOGRAMS = frozenset({"gateway_broadcast_duration_seconds", "gateway_delivery_lag_seconds"})


def seconds(n: float) -> float:
    """A test deadline of `n` seconds, scaled for slow machines."""
    return n * TIMEOUT_FACTOR


async def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll `predicate` until it is truthy (awaited if it returns an awaitable); fail the
    test after `timeout` (scaled) seconds."""
    deadline = time.monotonic() + seconds(timeout)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds(timeout):.1f}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream in a temp dir, on a free loopback port."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[Node]]:
    """Three nats-server processes with JetStream, routed together on loopback."""
    from natscluster import nats_cluster_nodes  # it imports helpers from this module

    with nats_cluster_nodes(tmp_path) as nodes:
        yield nodes


def make_settings(nats_url: str, **overrides: object) -> Settings:
    """Settings for a test gateway on a free loopback port."""
    base = Settings(nats_servers=(nats_url,), host="127.0.0.1", port=0, drain_s=0.0)
    return msgspec.structs.replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> AsyncIterator[Gateway]:
    """Serve a gateway in this event loop; on exit shut it down as SIGTERM would."""
    gateway = Gateway(settings, registry, tracer_provider)
    task = asyncio.create_task(gateway.serve())
    try:
        await wait_until(lambda: gateway.started or task.done(), what="the gateway to start")
        if task.done():
            task.result()  # raise what stopped it
        yield gateway
    finally:
        gateway.request_exit()
        await asyncio.wait_for(task, seconds(20))


def ws_url(gateway: Gateway, path: str = "/ws/stream") -> str:
    return f"ws://127.0.0.1:{gateway.port}{path}"


def http_url(gateway: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gateway.port}{path}"


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """A NATS connection for the test itself (publishing, inspecting)."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def recv_json(ws: websockets.ClientConnection, timeout: float = 5.0) -> dict[str, object]:
    """The next frame, which must be a JSON object in a text frame."""
    raw = await asyncio.wait_for(ws.recv(), seconds(timeout))
    assert isinstance(raw, str), "frames are text frames"
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric sample's value, 0 when it was never set."""
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def publish_json(js: JetStreamContext, doc: Mapping[str, object], **kw: object) -> int:
    """Publish `doc` on levels.signals; return its stream sequence."""
    ack = await js.publish("levels.signals", msgspec.json.encode(doc), **kw)  # type: ignore[arg-type]
    return int(ack.seq)


class GatewayProcess:
    """`python -m gateway` as a child process; its port is read back from its log."""

    _LISTENING = re.compile(r"(?:Uvicorn running on|workers listening on) http://[^:]+:(\d+)")

    def __init__(self, env: Mapping[str, str], args: tuple[str, ...] = ()) -> None:
        full_env = {**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: deque[str] = deque(maxlen=2000)
        self.port: int | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if (match := self._LISTENING.search(line)) is not None:
                self.port = int(match.group(1))
                self._started.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_started(self, timeout: float = 15.0) -> int:
        if not self._started.wait(seconds(timeout)):
            raise AssertionError(f"gateway did not start:\n{self.output}")
        assert self.port is not None
        return self.port

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(seconds(timeout))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)  # it ends at EOF, once every writer of the pipe is gone
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


@pytest.fixture
def gateway_process() -> Iterator[Callable[..., GatewayProcess]]:
    """Factory for gateway child processes; all are killed at teardown."""
    started: list[GatewayProcess] = []

    def start(env: Mapping[str, str], args: tuple[str, ...] = ()) -> GatewayProcess:
        proc = GatewayProcess(env, args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def stalled_client(port: int, path: str = "/ws/stream") -> socket.socket:
    """A client that completes the WebSocket handshake and then never reads a byte.

    A tiny receive buffer makes the server's writes back up within a few frames.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock
