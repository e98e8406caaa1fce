"""A 3-node nats-server cluster on loopback, and the helpers tests use with it.

Routes on free loopback ports, JetStream on every node, a monitoring port each (its
`/connz` tells which node a client is connected to). Used by test_cluster.py and
test_fleet.py through the `nats_cluster` fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import nats.js.errors
import websockets
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from gateway.natsserver import NatsServer

from conftest import publish_json, recv_json, seconds

STREAM, SUBJECT = "LEVEL_SIGNALS", "levels.signals"


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (bound together, so none repeats, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class Node:
    """One cluster member: its server process and its monitoring port."""

    name: str
    server: NatsServer
    monitor_port: int

    @property
    def url(self) -> str:
        return self.server.url

    async def client_names(self, http: httpx.AsyncClient) -> list[str]:
        """Names of the client connections this node holds (from its /connz)."""
        try:
            response = await http.get(f"http://127.0.0.1:{self.monitor_port}/connz?subs=1")
        except httpx.TransportError:
            return []  # the node is down
        return [conn.get("name", "") for conn in response.json()["connections"] or []]


@contextlib.contextmanager
def nats_cluster_nodes(tmp_path: Path) -> Iterator[list[Node]]:
    """Three nats-server processes with JetStream, routed together on loopback."""
    ports = free_ports(9)
    client_ports, cluster_ports, monitor_ports = ports[0:3], ports[3:6], ports[6:9]
    nodes: list[Node] = []
    try:
        for i in range(3):
            routes = ",".join(
                f"nats://127.0.0.1:{port}" for j, port in enumerate(cluster_ports) if j != i
            )
            server = NatsServer(
                tmp_path / f"node{i}",
                port=client_ports[i],
                extra_args=[
                    "--cluster_name", "c",
                    "--cluster", f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes", routes,
                    "-n", f"node{i}",
                    "-m", str(monitor_ports[i]),
                ],
            )  # fmt: skip
            nodes.append(Node(f"node{i}", server, monitor_ports[i]))
            server.start()
        yield nodes
    finally:
        for node in nodes:
            node.server.stop()


async def jetstream_answers(js: JetStreamContext) -> bool:
    try:
        await js.account_info()
    except (nats.errors.TimeoutError, nats.js.errors.APIError):
        return False  # no meta leader elected yet
    return True


async def stream_created(js: JetStreamContext) -> bool:
    try:
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[SUBJECT], num_replicas=3, allow_direct=True)
        )
    except nats.js.errors.BadRequestError:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.stream_info(STREAM)  # created by an earlier attempt that timed out
            return True
        return False
    except (nats.errors.TimeoutError, nats.js.errors.APIError):
        return False  # the cluster is still forming
    return True


@contextlib.asynccontextmanager
async def cluster_client(nodes: list[Node]) -> AsyncIterator[JetStreamContext]:
    """The test's own NATS connection to the cluster nodes given, with short JS timeouts."""
    nc = await nats.connect(
        [node.url for node in nodes],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        dont_randomize=True,
    )
    try:
        yield nc.jetstream(timeout=1.0)
    finally:
        await nc.close()


async def publish_until_stopped(js: JetStreamContext, stop: asyncio.Event) -> None:
    """Publish {"n": i} every 50 ms until `stop`; failures while leaders move are retried."""
    n = 1000
    while not stop.is_set():
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await publish_json(js, {"n": n}, timeout=1.0)
            n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)  # the publish rate, not a synchronisation


async def read_past(ws: websockets.ClientConnection, floor: int, timeout: float) -> list[int]:
    """Read frames until one has n > floor; return every n read (in order)."""
    seen: list[int] = []
    async with asyncio.timeout(seconds(timeout)):
        while not seen or seen[-1] <= floor:
            n = (await recv_json(ws, timeout))["n"]
            assert isinstance(n, int)
            seen.append(n)
    return seen
