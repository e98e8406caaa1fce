"""Horizontal scale on NATS: gateway replicas with their own consumers, and cluster failover.

Replicas share nothing but NATS: each binds its own consumer (a distinct durable, or an
ephemeral one), so every replica relays every message. A 3-node nats-server cluster
(routes on loopback, the stream replicated 3 times) keeps relaying when the node the
gateway is connected to dies: the gateway moves to another server of its `NATS_URL` list
and its consumer continues there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
import websockets
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer
from gateway.server import Gateway

from conftest import (
    jetstream,
    make_settings,
    publish_json,
    recv_json,
    running_gateway,
    seconds,
    wait_until,
)

pytestmark = pytest.mark.anyio

STREAM, SUBJECT = "LEVEL_SIGNALS", "levels.signals"


async def connect_clients(gw: Gateway, n: int) -> list[websockets.ClientConnection]:
    clients = [await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws/stream") for _ in range(n)]
    await wait_until(lambda: len(gw.hub.active_connections) == n, what=f"{n} clients")
    return clients


# --- (a) several gateway replicas on one nats-server -----------------------------------


@pytest.mark.parametrize(
    "durables",
    [
        pytest.param(("gateway_a", "gateway_b", "gateway_c"), id="distinct-durables"),
        pytest.param(("", "", ""), id="ephemeral"),
    ],
)
async def test_every_replica_relays_every_message(
    nats_server: NatsServer, durables: tuple[str, ...]
) -> None:
    """Replicas with their own consumers (durable or ephemeral) each relay every message."""
    async with contextlib.AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(
                running_gateway(make_settings(nats_server.url, durable=durable))
            )
            for durable in durables
        ]
        for gw in gateways:
            await wait_until(lambda gw=gw: gw.relay.ready, what="every relay to subscribe")
        clients = {gw: await connect_clients(gw, 2) for gw in gateways}
        for ws_list in clients.values():
            stack.push_async_callback(asyncio.gather, *(ws.close() for ws in ws_list))
        js = await stack.enter_async_context(jetstream(nats_server.url))
        for n in range(30):
            await publish_json(js, {"n": n})
            # Paced by the slowest replica: a relay that falls far behind skips to the newest
            # state by design, and this test is about every replica, not about overload.
            await wait_until(
                lambda n=n: all(gw.hub.latest_payload == f'{{"n":{n}}}' for gw in gateways),
                what=f"every replica to relay message {n}",
            )
        for ws_list in clients.values():
            for ws in ws_list:
                assert [(await recv_json(ws))["n"] for _ in range(30)] == list(range(30))
        consumers = {info.name for info in await js.consumers_info(STREAM)}
    assert len(consumers) == len(durables), "one consumer per replica"
    if all(durables):
        assert consumers == set(durables)


async def test_replicas_sharing_a_durable_split_the_messages(nats_server: NatsServer) -> None:
    """Two replicas bound to the same durable share its messages: why each needs its own."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    async with contextlib.AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(running_gateway(make_settings(nats_server.url), reg))
            for reg in registries
        ]
        for gw in gateways:
            await wait_until(lambda gw=gw: gw.relay.ready, what="both relays to subscribe")
        js = await stack.enter_async_context(jetstream(nats_server.url))
        for n in range(40):
            await publish_json(js, {"n": n})

        def received() -> list[float]:
            return [r.get_sample_value("gateway_messages_received_total") or 0 for r in registries]

        await wait_until(lambda: sum(received()) >= 40, what="all messages to be consumed")
    # A work queue, not a broadcast: the messages were divided, not duplicated.
    assert sum(received()) == 40


# --- (b) a 3-node nats-server cluster --------------------------------------------------


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


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[Node]]:
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


async def _jetstream_answers(js: JetStreamContext) -> bool:
    try:
        await js.account_info()
    except (nats.errors.TimeoutError, nats.js.errors.APIError):
        return False  # no meta leader elected yet
    return True


async def _stream_created(js: JetStreamContext) -> bool:
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


async def _publish_until_stopped(js: JetStreamContext, stop: asyncio.Event) -> None:
    """Publish {"n": i} every 50 ms until `stop`; failures while leaders move are retried."""
    n = 1000
    while not stop.is_set():
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await publish_json(js, {"n": n}, timeout=1.0)
            n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)  # the publish rate, not a synchronisation


async def _read_past(ws: websockets.ClientConnection, floor: int, timeout: float) -> list[int]:
    """Read frames until one has n > floor; return every n read (in order)."""
    seen: list[int] = []
    async with asyncio.timeout(seconds(timeout)):
        while not seen or seen[-1] <= floor:
            n = (await recv_json(ws, timeout))["n"]
            assert isinstance(n, int)
            seen.append(n)
    return seen


@pytest.mark.parametrize("durable", ["gateway_levels", ""], ids=["durable", "ephemeral"])
async def test_gateway_fails_over_when_its_cluster_node_dies(
    nats_cluster: list[Node], durable: str
) -> None:
    """SIGKILL the cluster node the gateway is connected to: relaying continues, clients stay."""
    registry = CollectorRegistry()
    async with cluster_client(nats_cluster) as js:
        await wait_until(lambda: _jetstream_answers(js), timeout=30, what="a JetStream leader")
        await wait_until(lambda: _stream_created(js), timeout=30, what="the R3 stream")
        info = await js.stream_info(STREAM)
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2, "the stream has 3 replicas"

    servers = tuple(node.url for node in nats_cluster)
    settings = make_settings(servers[0], nats_servers=servers, durable=durable)
    async with (
        running_gateway(settings, registry) as gw,
        httpx.AsyncClient(timeout=2.0) as http,
    ):
        await wait_until(lambda: gw.relay.ready, timeout=20, what="the relay to subscribe")

        async def gateway_node() -> Node | None:
            for node in nats_cluster:
                if "gateway" in await node.client_names(http):
                    return node
            return None

        await wait_until(gateway_node, what="the gateway's connection in some /connz")
        victim = await gateway_node()
        assert victim is not None
        survivors = [node for node in nats_cluster if node is not victim]
        clients = await connect_clients(gw, 3)
        try:
            async with cluster_client(survivors) as js:
                await publish_json(js, {"n": 0})
                for ws in clients:
                    assert await recv_json(ws) == {"n": 0}

                victim.server.stop(signal.SIGKILL)
                stop = asyncio.Event()
                publisher = asyncio.create_task(_publish_until_stopped(js, stop))
                try:
                    # Leaders move and the gateway reconnects: frames flow again on every client.
                    for ws in clients:
                        seen = await _read_past(ws, 999, timeout=45)
                        assert seen == sorted(set(seen)), "in order, no repeats"
                finally:
                    stop.set()
                    await publisher
                await publish_json(js, {"n": 10**6})
                for ws in clients:
                    seen = await _read_past(ws, 10**6 - 1, timeout=10)
                    assert seen == sorted(set(seen)), "in order, no repeats"
                    assert seen[-1] == 10**6
            moved_to = await gateway_node()
            assert moved_to in survivors, "the gateway reconnected to a surviving node"
            # Nobody was disconnected: the same three connections carried everything.
            assert len(gw.hub.active_connections) == 3
            assert registry.get_sample_value("gateway_connections_total") == 3
            assert registry.get_sample_value("gateway_send_failures_total") == 0
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))


@pytest.mark.parametrize("durable", ["gateway_levels", ""], ids=["durable", "ephemeral"])
async def test_gateway_survives_loss_of_its_consumer_leader(
    nats_cluster: list[Node], durable: str
) -> None:
    """SIGKILL the node leading the gateway's consumer (an ephemeral's only copy): relay resumes."""
    registry = CollectorRegistry()
    async with cluster_client(nats_cluster) as js:
        await wait_until(lambda: _jetstream_answers(js), timeout=30, what="a JetStream leader")
        await wait_until(lambda: _stream_created(js), timeout=30, what="the R3 stream")

    servers = tuple(node.url for node in nats_cluster)
    settings = make_settings(servers[0], nats_servers=servers, durable=durable)
    async with running_gateway(settings, registry) as gw:
        await wait_until(lambda: gw.relay.ready, timeout=20, what="the relay to subscribe")
        clients = await connect_clients(gw, 2)
        try:
            async with cluster_client(nats_cluster) as js:
                (consumer,) = await js.consumers_info(STREAM)
                assert consumer.cluster is not None
                victim = next(n for n in nats_cluster if n.name == consumer.cluster.leader)
                victim.server.stop(signal.SIGKILL)
                stop = asyncio.Event()
                publisher = asyncio.create_task(_publish_until_stopped(js, stop))
                try:
                    for ws in clients:
                        seen = await _read_past(ws, 999, timeout=45)
                        assert seen == sorted(set(seen)), "in order, no repeats"
                finally:
                    stop.set()
                    await publisher
            assert len(gw.hub.active_connections) == 2
            assert registry.get_sample_value("gateway_connections_total") == 2
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))
