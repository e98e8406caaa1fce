"""End to end: a real nats-server, the real gateway on a real socket, real WebSocket clients."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import websockets
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer

from conftest import (
    jetstream,
    make_settings,
    publish_json,
    recv_json,
    running_gateway,
    sample,
    seconds,
    stalled_client,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio


async def all_acked(js: JetStreamContext) -> bool:
    """The durable consumer has nothing pending and nothing awaiting acknowledgement."""
    info = await js.consumer_info("LEVEL_SIGNALS", "gateway_levels")
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_frames_arrive_in_order_and_byte_identical(nats_server: NatsServer) -> None:
    """Every payload reaches a client in publish order, with exactly the published bytes."""
    payloads = [f'{{"n": {i}, "pad": "{"é" * i}",  "spaced" :true}}'.encode() for i in range(20)]
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
            (client,) = gw.hub.active_connections
            assert client.sink._direct is not None, "uvicorn offers the direct write path"  # type: ignore[attr-defined]
            for data in payloads:
                await js.publish("levels.signals", data)
            received = [await asyncio.wait_for(ws.recv(decode=False), seconds(5)) for _ in payloads]
            # Every frame took the direct write, none the per-client ASGI encoding: a
            # uvicorn upgrade that silently falls back fails here.
            assert client.sink._direct.direct_writes == len(payloads)  # type: ignore[attr-defined]
    assert received == payloads


async def test_new_client_gets_cached_payload_at_once(nats_server: NatsServer) -> None:
    """A client connecting after a message was relayed receives it immediately."""
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await publish_json(js, {"state": 1})
        await publish_json(js, {"state": 2})
        await wait_until(lambda: gw.hub.latest_payload == '{"state":2}', what="the cache")
        async with websockets.connect(ws_url(gw)) as ws:
            assert await recv_json(ws) == {"state": 2}


async def test_restart_primes_cache_and_skips_stale_backlog(nats_server: NatsServer) -> None:
    """After a restart the durable resumes: clients get the newest state, not a stale burst."""
    registry = CollectorRegistry()
    async with jetstream(nats_server.url) as js:
        async with running_gateway(make_settings(nats_server.url)) as gw:
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
            await publish_json(js, {"n": 0})
            await wait_until(lambda: gw.hub.latest is not None, what="the first message")
        # Gateway down: a backlog builds up on its durable consumer.
        for n in range(1, 51):
            await publish_json(js, {"n": n})
        async with running_gateway(make_settings(nats_server.url), registry) as gw:
            async with websockets.connect(ws_url(gw)) as ws:
                assert await recv_json(ws) == {"n": 50}, "the cache is primed with the newest"
                await wait_until(
                    lambda: sample(registry, "gateway_messages_received_total") >= 50,
                    what="the backlog to drain",
                )
                await publish_json(js, {"n": 51})
                assert await recv_json(ws) == {"n": 51}, "no stale frame came in between"
            await wait_until(lambda: all_acked(js), what="the backlog to be acknowledged")


async def test_invalid_messages_are_counted_acked_and_skipped(nats_server: NatsServer) -> None:
    """Non-JSON, arrays, bad UTF-8 and empty messages are skipped; the cache keeps the last good."""
    registry = CollectorRegistry()
    bad = [b"not json", b"[1, 2]", b"\xff\xfe{}", b"", b'"just a string"']
    async with (
        running_gateway(make_settings(nats_server.url), registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            await publish_json(js, {"good": 1})
            assert await recv_json(ws) == {"good": 1}
            for data in bad:
                await js.publish("levels.signals", data)
            await publish_json(js, {"good": 2})
            assert await recv_json(ws) == {"good": 2}, "nothing invalid was relayed"
        assert sample(registry, "gateway_messages_invalid_total") == len(bad)
        assert gw.hub.latest_payload == '{"good":2}'
        # Invalid messages are acknowledged too: nothing stays pending, nothing redelivered.
        await wait_until(lambda: all_acked(js), what="every message to be acknowledged")


async def test_stalled_client_does_not_delay_others_and_is_dropped(nats_server: NatsServer) -> None:
    """A client that never reads is dropped after the send timeout; others get every frame."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, send_timeout_s=1.0)
    big = {"pad": "x" * 200_000}
    async with (
        running_gateway(settings, registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        stalled = stalled_client(gw.port)
        async with websockets.connect(ws_url(gw), max_size=None) as healthy:
            await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
            for n in range(30):
                await publish_json(js, {**big, "n": n})
                assert (await recv_json(healthy))["n"] == n
            await wait_until(
                lambda: len(gw.hub.active_connections) == 1,
                timeout=10,
                what="the stalled client to be dropped",
            )
            assert sample(registry, "gateway_send_failures_total") == 1
            await publish_json(js, {"after": True})
            assert await recv_json(healthy) == {"after": True}
        stalled.close()


async def test_clients_stay_connected_while_nats_restarts(nats_server: NatsServer) -> None:
    """NATS killed and restarted on the same port and store: relaying resumes, clients stay."""
    async with running_gateway(make_settings(nats_server.url)) as gw:
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            async with jetstream(nats_server.url) as js:
                await publish_json(js, {"before": True})
                assert await recv_json(ws) == {"before": True}
            port = nats_server.port
            nats_server.stop()
            await wait_until(lambda: not gw.relay.ready, what="the gateway to notice")
            restarted = NatsServer(nats_server.store_dir, port=port).start()
            try:
                await wait_until(lambda: gw.relay.ready, timeout=20, what="reconnection")
                async with jetstream(restarted.url) as js:
                    await publish_json(js, {"after": True})
                    assert await recv_json(ws, timeout=10) == {"after": True}
            finally:
                restarted.stop()


async def test_starts_without_nats_and_becomes_ready_when_it_appears(
    nats_server: NatsServer,
) -> None:
    """NATS absent at start: the gateway serves, degraded, then relays once NATS is up."""
    port = nats_server.port
    nats_server.stop()
    settings = make_settings(f"nats://127.0.0.1:{port}")
    async with running_gateway(settings) as gw, websockets.connect(ws_url(gw)) as ws:
        assert not gw.relay.ready, "accepted while NATS is down"
        server = NatsServer(nats_server.store_dir, port=port).start()
        try:
            await wait_until(lambda: gw.relay.ready, timeout=20, what="the relay")
            async with jetstream(server.url) as js:
                await publish_json(js, {"hello": "late"})
            assert await recv_json(ws) == {"hello": "late"}
        finally:
            server.stop()


async def test_ephemeral_consumer_when_durable_is_empty(nats_server: NatsServer) -> None:
    """GATEWAY_DURABLE empty: the gateway relays through an ephemeral consumer."""
    async with (
        running_gateway(make_settings(nats_server.url, durable="")) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            await publish_json(js, {"eph": 1})
            assert await recv_json(ws) == {"eph": 1}
        names = [info.name for info in await js.consumers_info("LEVEL_SIGNALS")]
    assert "gateway_levels" not in names
    assert len(names) == 1


def test_payload_bytes_survive_json_roundtrip_unchanged() -> None:
    """The frame text is the payload decoded once (no re-serialization)."""
    from gateway.payload import validate

    data = msgspec.json.encode({"b": 1, "a": [1.50, "ü"]}) + b" "
    assert validate(data, 1 << 20).encode() == data


async def test_half_open_client_is_found_by_ping(nats_server: NatsServer) -> None:
    """A client that never answers pings (gone without a close) is removed after a period."""
    settings = make_settings(nats_server.url, ping_interval_s=0.3)
    async with running_gateway(settings) as gw, websockets.connect(ws_url(gw)) as alive:
        silent = stalled_client(gw.port)  # completes the handshake, then never answers
        try:
            await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
            await wait_until(
                lambda: len(gw.hub.active_connections) == 1,
                timeout=5,
                what="the silent client to be dropped by the ping timeout",
            )
            await alive.ping()  # the live client answers pings and stays
        finally:
            silent.close()


async def test_floor_resets_when_the_stream_is_recreated_at_the_same_sequence(
    nats_server: NatsServer,
) -> None:
    """A recreated stream is noticed by its creation time, even at the old last sequence."""
    from gateway.hub import SocketBroadcaster
    from gateway.metrics import Metrics
    from gateway.relay import Relay
    from gateway.streams import ensure_stream

    metrics = Metrics(CollectorRegistry(), process=False)
    relay = Relay(make_settings(nats_server.url), SocketBroadcaster(metrics, 5.0), metrics)
    async with jetstream(nats_server.url) as js:
        await relay._ensure_stream(js)  # creates the stream, notes its creation time
        for n in range(3):
            await publish_json(js, {"old": n})
        relay.ingest.floor = 3  # the old stream's newest state was relayed
        await relay._ensure_stream(js)
        assert relay.ingest.floor == 3, "same stream: the floor stays"
        # Someone deletes and recreates it, and it reaches seq 3 before the relay looks.
        await js.delete_stream("LEVEL_SIGNALS")
        await ensure_stream(js, "LEVEL_SIGNALS", "levels.signals")
        for n in range(3):
            await publish_json(js, {"new": n})
        await relay._ensure_stream(js)
    assert relay.ingest.floor == 0, "new stream with the same last sequence: the floor went"
