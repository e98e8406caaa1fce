"""What the bench measures: nats-server's WebSocket listener, or a Python relay child process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from benchkit.children import Child, free_port, http_get, wait_http
from benchkit.procs import descendants, proc_cpu_s, proc_rss_kib

HERE = Path(__file__).resolve().parents[1]  # loadtest/


class Target:
    name = ""
    protocol = "relay"  # "relay": frames are the payloads; "nats": NATS protocol over WS

    def urls(self) -> list[str]:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def connections(self) -> int | None:
        """Connected clients as the server counts them (relays' /health), None if unknown."""
        return None

    def cpu_s(self, kernel_only: bool = False) -> float:
        return sum(proc_cpu_s(pid, kernel_only) for pid in self.pids())

    def rss_kib(self) -> int:
        return sum(proc_rss_kib(pid) for pid in self.pids())


class NatsTarget(Target):
    name = "nats"
    protocol = "nats"

    def __init__(self, server: Any, ws_port: int) -> None:
        self.server = server
        self.ws_port = ws_port

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.ws_port}/"]

    def pids(self) -> list[int]:
        return [self.server.pid]


class RelayTarget(Target):
    """A Python relay run as a child process on loopback."""

    health_path = "/health"
    ready_path = "/health"

    def __init__(self, nats_url: str, logdir: Path) -> None:
        self.nats_url = nats_url
        self.logdir = logdir
        self.child: Child | None = None
        self.port = 0
        self._pids: list[int] = []

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self, port: int) -> dict[str, str]:
        raise NotImplementedError

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.port}/ws/stream"]

    def pids(self) -> list[int]:
        return self._pids

    async def start(self) -> None:
        self.port = free_port()
        self.child = Child(self.name, self.argv(), self.env(self.port), self.logdir)
        await wait_http(self.child, self.port, self.ready_path)
        self._pids = descendants(self.child.pid)  # itself, and its workers if it has any

    async def stop(self) -> None:
        child, self.child, self._pids = self.child, None, []
        if child is not None:
            await asyncio.to_thread(child.stop)

    async def connections(self) -> int | None:
        try:
            _, body = await http_get(self.port, self.health_path)
            return int(json.loads(body)["connections"])
        except (OSError, TimeoutError, ValueError, KeyError):
            return None


class GatewayTarget(RelayTarget):
    name = "gateway"
    ready_path = "/ready"  # connected to NATS and subscribed
    uvloop = False
    workers = 1  # GATEWAY_WORKERS

    def __init__(
        self, nats_url: str, logdir: Path, *, name: str = "", compression: str = ""
    ) -> None:
        super().__init__(nats_url, logdir)
        self.name = name or self.name
        self.compression = compression  # GATEWAY_WS_COMPRESSION; "" = the default (on)

    def argv(self) -> list[str]:
        if self.uvloop:  # the same `gateway` command, with uvloop as asyncio's loop
            code = "import sys, uvloop; uvloop.install(); from gateway.cli import main; "
            return [sys.executable, "-c", code + "sys.exit(main())"]
        return [sys.executable, "-m", "gateway"]

    def env(self, port: int) -> dict[str, str]:
        return {
            "NATS_URL": self.nats_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_MAX_CONNECTIONS": "1000000",
            "GATEWAY_DURABLE": "",  # ephemeral: every process (replica) its own consumer
            "GATEWAY_DRAIN_S": "0",
            "GATEWAY_WORKERS": str(self.workers),
        } | ({"GATEWAY_WS_COMPRESSION": self.compression} if self.compression else {})


class NaiveTarget(RelayTarget):
    name = "naive"
    loop = "asyncio"  # the gateway's loop

    def argv(self) -> list[str]:
        return [sys.executable, str(HERE / "naive_relay.py")]

    def env(self, port: int) -> dict[str, str]:
        env = {"NATS_URL": self.nats_url, "HOST": "127.0.0.1", "PORT": str(port)}
        return {**env, "NAIVE_LOOP": self.loop}


class AltGatewayTarget(GatewayTarget):
    """The `gateway` package found in another directory (a variant of the hub, say)."""

    def __init__(self, name: str, pkg_parent: Path, nats_url: str, logdir: Path) -> None:
        super().__init__(nats_url, logdir)
        self.name = name
        self.pkg_parent = pkg_parent

    def env(self, port: int) -> dict[str, str]:
        return {**super().env(port), "PYTHONPATH": str(self.pkg_parent)}


class GatewayUvloopTarget(GatewayTarget):
    name = "gateway-uvloop"
    uvloop = True


class NaiveUvloopTarget(NaiveTarget):
    name = "naive-uvloop"
    loop = "uvloop"
