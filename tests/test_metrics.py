"""The metrics contract moves exactly with real traffic through NATS and real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import websockets
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from websockets.exceptions import InvalidStatus

from gateway.metrics import CLOSE_REASONS
from gateway.natsserver import NatsServer
from gateway.server import Gateway

from conftest import (
    jetstream,
    make_settings,
    publish_json,
    running_gateway,
    seconds,
    stalled_client,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio

MESSAGES = 12
CLIENTS = 4


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


async def test_counters_follow_messages_times_clients(nats_server: NatsServer) -> None:
    """N messages to K clients: received N, sent N*K, N broadcasts and N*K lags observed."""
    registry = CollectorRegistry()
    async with (
        running_gateway(make_settings(nats_server.url), registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        clients = [await websockets.connect(ws_url(gw)) for _ in range(CLIENTS)]
        await wait_until(lambda: len(gw.hub.active_connections) == CLIENTS, what="the clients")
        assert value(registry, "gateway_connections_active") == CLIENTS
        assert value(registry, "gateway_connections_total") == CLIENTS
        for n in range(MESSAGES):
            await publish_json(js, {"n": n, "ts": time.time()})
            for ws in clients:  # each client keeps up: it reads every frame
                await asyncio.wait_for(ws.recv(), seconds(5))
        await js.publish("levels.signals", b"not json")
        await publish_json(js, {"n": -1})
        for ws in clients:
            await asyncio.wait_for(ws.recv(), seconds(5))
        await wait_until(
            lambda: value(registry, "gateway_messages_invalid_total") == 1, what="the invalid one"
        )
        relayed = MESSAGES + 1
        assert value(registry, "gateway_messages_received_total") == relayed + 1
        assert value(registry, "gateway_messages_sent_total") == relayed * CLIENTS
        assert value(registry, "gateway_messages_conflated_total") == 0
        assert value(registry, "gateway_send_failures_total") == 0
        assert value(registry, "gateway_broadcast_duration_seconds_count") == relayed
        assert value(registry, "gateway_delivery_lag_seconds_count") == relayed * CLIENTS
        latest = gw.hub.latest
        assert latest is not None
        assert value(registry, "gateway_last_message_timestamp_seconds") == latest.published_at
        for ws in clients:
            await ws.close()
        await wait_until(
            lambda: value(registry, "gateway_connections_active") == 0, what="the gauge to drop"
        )


async def test_nats_gauges_are_current_without_traffic(nats_server: NatsServer) -> None:
    """nats_connected and consumer_lag are kept current even when no message flows."""
    registry = CollectorRegistry()
    async with jetstream(nats_server.url) as js:
        async with running_gateway(make_settings(nats_server.url), registry) as gw:
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
            assert value(registry, "gateway_nats_connected") == 1
        for n in range(7):  # the gateway is down: a backlog builds on its durable consumer
            await publish_json(js, {"n": n})
        registry = CollectorRegistry()
        async with running_gateway(make_settings(nats_server.url), registry) as gw:
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
            await wait_until(
                lambda: (
                    value(registry, "gateway_consumer_lag") == 0
                    and value(registry, "gateway_messages_received_total") == 7
                ),
                what="the backlog to drain and the lag gauge to follow",
            )
            nats_server.stop()
            await wait_until(
                lambda: value(registry, "gateway_nats_connected") == 0, what="the disconnect"
            )


async def test_rejections_are_counted_by_reason(nats_server: NatsServer) -> None:
    """Refused handshakes count under their reason label: origin, auth, capacity."""
    registry = CollectorRegistry()
    settings = make_settings(
        nats_server.url,
        allowed_origins=frozenset({"https://ok.example"}),
        auth_token="t",
        max_connections=1,
    )
    async with running_gateway(settings, registry) as gw:
        url = ws_url(gw, "/ws/stream?token=t")
        with pytest.raises(InvalidStatus):
            await websockets.connect(url, origin="https://evil.example")  # type: ignore[arg-type]
        with pytest.raises(InvalidStatus):
            await websockets.connect(ws_url(gw))
        async with websockets.connect(url), websockets.connect(url) as over:
            await asyncio.wait_for(over.wait_closed(), seconds(5))
    assert value(registry, "gateway_connections_rejected_total", reason="origin") == 1
    assert value(registry, "gateway_connections_rejected_total", reason="auth") == 1
    assert value(registry, "gateway_connections_rejected_total", reason="capacity") == 1
    assert value(registry, "gateway_connections_total") == 1, "a refused client is not counted"
    assert value(registry, "gateway_connections_max") == 1, "the cap, for GatewayConnectionsNearCap"


async def test_relay_behind_skips_stale_messages_and_counts_them(nats_server: NatsServer) -> None:
    """Messages with more than MAX_BEHIND newer ones waiting are skipped and counted."""
    from gateway.ingest import MAX_BEHIND

    backlog = 30
    async with jetstream(nats_server.url) as js:
        async with running_gateway(make_settings(nats_server.url)) as gw:
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        for n in range(backlog):  # the gateway is down: its durable falls behind
            await publish_json(js, {"n": n})
        registry = CollectorRegistry()
        async with running_gateway(make_settings(nats_server.url), registry) as gw:
            await wait_until(
                lambda: value(registry, "gateway_messages_received_total") == backlog,
                what="the backlog to drain",
            )
    assert value(registry, "gateway_messages_skipped_total") == backlog - MAX_BEHIND - 1


async def _client_leaves(gw: Gateway, js: JetStreamContext) -> None:
    async with websockets.connect(ws_url(gw)):
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")


async def _frame_too_big(gw: Gateway, js: JetStreamContext) -> None:
    async with websockets.connect(ws_url(gw), max_size=None) as ws:
        await ws.send("x" * 2048)  # over max_inbound_bytes=1024
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), seconds(5))


async def _over_capacity(gw: Gateway, js: JetStreamContext) -> None:
    async with websockets.connect(ws_url(gw)):
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the first client")
        async with websockets.connect(ws_url(gw)) as second:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(second.recv(), seconds(5))


async def _stalled_reader(gw: Gateway, js: JetStreamContext) -> None:
    sock = stalled_client(gw.port)
    try:
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the stalled client")
        for n in range(30):  # 6 MB: more than its socket buffers hold, so a send stalls
            await publish_json(js, {"n": n, "pad": "x" * 200_000})
            await wait_until(
                lambda n=n: gw.hub.latest is not None and f'"n":{n},' in gw.hub.latest.text,
                what=f"message {n} to be relayed",
            )
        await wait_until(lambda: not gw.hub.active_connections, what="the client to be dropped")
    finally:
        sock.close()


async def _silent_peer(gw: Gateway, js: JetStreamContext) -> None:
    sock = stalled_client(gw.port)  # never answers a ping
    try:
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the silent client")
        await wait_until(lambda: not gw.hub.active_connections, what="the ping timeout")
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("reason", "scenario", "overrides"),
    [
        ("client", _client_leaves, {}),
        ("too_big", _frame_too_big, {"max_inbound_bytes": 1024}),
        ("capacity", _over_capacity, {"max_connections": 1}),
        ("send_timeout", _stalled_reader, {"send_timeout_s": 0.3}),
        ("ping_timeout", _silent_peer, {"ping_interval_s": 0.3}),
    ],
)
async def test_every_closed_connection_is_counted_with_its_reason(
    nats_server: NatsServer,
    reason: str,
    scenario: Callable[[Gateway, JetStreamContext], Awaitable[None]],
    overrides: dict[str, object],
) -> None:
    """Each way a connection ends adds one to gateway_connections_closed_total{reason}."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, **overrides)
    async with running_gateway(settings, registry) as gw, jetstream(nats_server.url) as js:
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await scenario(gw, js)

        def closed() -> dict[str, float]:
            return {
                r: value(registry, "gateway_connections_closed_total", reason=r)
                for r in CLOSE_REASONS
            }

        others = {"client": 1} if reason == "capacity" else {}  # the first client leaves
        expected = dict.fromkeys(CLOSE_REASONS, 0) | others | {reason: 1}
        await wait_until(lambda: closed() == expected, what=f"one close for {reason}")


async def test_clients_closed_by_shutdown_are_counted_as_shutdown(nats_server: NatsServer) -> None:
    """A client still connected at SIGTERM is closed with 1001 and counted as `shutdown`."""
    registry = CollectorRegistry()
    async with running_gateway(make_settings(nats_server.url), registry) as gw:
        ws = await websockets.connect(ws_url(gw))
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), seconds(5))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert value(registry, "gateway_connections_closed_total", reason="shutdown") == 1
