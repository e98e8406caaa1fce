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

import httpx
import pytest
import websockets
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer
from gateway.server import Gateway
from natscluster import (
    STREAM,
    Node,
    cluster_client,
    jetstream_answers,
    publish_until_stopped,
    read_past,
    stream_created,
)

from conftest import (
    http_url,
    jetstream,
    make_settings,
    publish_json,
    recv_json,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.anyio


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
        pytest.param(("gateway_levels",) * 3, id="identical-defaults"),
    ],
)
async def test_every_replica_relays_every_message(
    nats_server: NatsServer, durables: tuple[str, ...]
) -> None:
    """Replicas with their own consumers each relay every message, also from one environment."""
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
        assert {gw.relay.consumer for gw in gateways} == consumers
        assert not any(gw.relay.sharing.shared for gw in gateways)
    assert len(consumers) == len(durables), "one consumer per replica"
    if durables[0] == "gateway_levels":  # leased: the first replica keeps the seed's name
        assert consumers == {"gateway_levels", "gateway_levels_2", "gateway_levels_3"}
    elif all(durables):
        assert consumers == set(durables)


async def test_replicas_forced_onto_one_durable_say_so(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas forced onto one durable (leases off) split it, and each one says so."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    settings = make_settings(nats_server.url, consumer_lease=False)
    async with contextlib.AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(running_gateway(settings, reg)) for reg in registries
        ]
        for gw in gateways:
            await wait_until(lambda gw=gw: gw.relay.ready, what="both relays to subscribe")
        assert {gw.relay.consumer for gw in gateways} == {"gateway_levels"}
        js = await stack.enter_async_context(jetstream(nats_server.url))
        http = await stack.enter_async_context(httpx.AsyncClient())

        def received() -> list[float]:
            return [r.get_sample_value("gateway_messages_received_total") or 0 for r in registries]

        for n in range(40):
            await publish_json(js, {"n": n})
            await wait_until(lambda n=n: sum(received()) == n + 1, what=f"message {n} consumed")
            if all(gw.relay.sharing.shared for gw in gateways):
                break
        # A work queue, not a broadcast: the messages were divided, not duplicated...
        assert sum(received()) == n + 1
        assert all(received()), "each replica got a part"
        # ...and the operator is told, by every replica: metric, /health, one log line.
        for gw, registry in zip(gateways, registries, strict=True):
            assert gw.relay.sharing.shared
            assert registry.get_sample_value("gateway_consumer_shared") == 1
            health = (await http.get(http_url(gw, "/health"))).json()
            assert health["status"] == "degraded"
            assert health["consumer"] == "gateway_levels"
    warnings = [r for r in caplog.records if "another process is pulling" in r.getMessage()]
    assert len(warnings) == 2, "one line per replica"


@pytest.mark.parametrize("durable", ["gateway_levels", ""], ids=["durable", "ephemeral"])
async def test_gateway_fails_over_when_its_cluster_node_dies(
    nats_cluster: list[Node], durable: str
) -> None:
    """SIGKILL the cluster node the gateway is connected to: relaying continues, clients stay."""
    registry = CollectorRegistry()
    async with cluster_client(nats_cluster) as js:
        await wait_until(lambda: jetstream_answers(js), timeout=30, what="a JetStream leader")
        await wait_until(lambda: stream_created(js), timeout=30, what="the R3 stream")
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
                publisher = asyncio.create_task(publish_until_stopped(js, stop))
                try:
                    # Leaders move and the gateway reconnects: frames flow again on every client.
                    for ws in clients:
                        seen = await read_past(ws, 999, timeout=45)
                        assert seen == sorted(set(seen)), "in order, no repeats"
                finally:
                    stop.set()
                    await publisher
                await publish_json(js, {"n": 10**6})
                for ws in clients:
                    seen = await read_past(ws, 10**6 - 1, timeout=10)
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
        await wait_until(lambda: jetstream_answers(js), timeout=30, what="a JetStream leader")
        await wait_until(lambda: stream_created(js), timeout=30, what="the R3 stream")

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
                publisher = asyncio.create_task(publish_until_stopped(js, stop))
                try:
                    for ws in clients:
                        seen = await read_past(ws, 999, timeout=45)
                        assert seen == sorted(set(seen)), "in order, no repeats"
                finally:
                    stop.set()
                    await publisher
            assert len(gw.hub.active_connections) == 2
            assert registry.get_sample_value("gateway_connections_total") == 2
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))
