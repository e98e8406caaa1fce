"""`GET /sse/stream`: the WebSocket stream as Server-Sent Events, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer
from gateway.server import Gateway

from conftest import (
    http_url,
    jetstream,
    make_settings,
    publish_json,
    running_gateway,
    sample,
    seconds,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio


class Events:
    """Reads one event stream: each event's fields, as an EventSource would see them."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.retry: str | None = None

    async def next(self, timeout: float = 5.0) -> dict[str, str]:
        """The next event with data: {"id": ..., "data": joined data lines}."""
        event: dict[str, list[str]] = {}
        async with asyncio.timeout(seconds(timeout)):
            async for line in self._lines:
                if not line:
                    if "data" in event:
                        return {k: "\n".join(v) for k, v in event.items()}
                    event = {}
                    continue
                if line.startswith(":"):
                    continue  # a comment (keepalive)
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "retry":
                    self.retry = value
                else:
                    event.setdefault(field, []).append(value)
        raise EOFError("the stream ended")


@contextlib.asynccontextmanager
async def events(gw: Gateway, path: str = "/sse/stream", **kw: object) -> AsyncIterator[Events]:
    async with (
        httpx.AsyncClient(timeout=seconds(30)) as http,
        http.stream("GET", http_url(gw, path), **kw) as response,  # type: ignore[arg-type]
    ):
        assert response.status_code == 200
        yield Events(response)


async def test_cached_payload_first_then_every_payload_in_order(nats_server: NatsServer) -> None:
    """The newest payload at once, then each later one in order, `id:` its stream sequence."""
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        first = await publish_json(js, {"n": 0})
        await wait_until(lambda: gw.hub.latest is not None, what="a cached payload")
        async with events(gw) as stream:
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert stream.response.headers["cache-control"] == "no-cache"
            assert await stream.next() == {"id": str(first), "data": '{"n":0}'}
            assert stream.retry is not None, "a reconnect hint comes first"
            seqs = [await publish_json(js, {"n": n}) for n in range(1, 21)]
            got = [await stream.next() for _ in range(20)]
        assert [e["id"] for e in got] == [str(s) for s in seqs]
        assert [e["data"] for e in got] == [f'{{"n":{n}}}' for n in range(1, 21)]


async def test_a_payload_with_line_breaks_arrives_whole(nats_server: NatsServer) -> None:
    """Line breaks become several `data:` lines; joined, they are the exact payload."""
    payload = b'{\n  "spy": {"spot": 600.5},\n  "levels": []\n}'
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
        events(gw) as stream,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
        await js.publish("levels.signals", payload)
        assert (await stream.next())["data"].encode() == payload


@pytest.mark.parametrize(
    ("overrides", "path", "headers", "status"),
    [
        ({"allowed_origins": frozenset({"https://app.example.com"})}, "/sse/stream",
         {"Origin": "https://evil.example.com"}, 403),
        ({"auth_token": "t0k"}, "/sse/stream", {}, 401),
        ({"auth_token": "t0k"}, "/sse/stream?token=wrong", {}, 401),
        ({"auth_token": "t0k"}, "/sse/stream", {"Authorization": "Bearer wrong"}, 401),
        ({"auth_token": "t0k"}, "/sse/stream?token=t0k", {}, 200),
        ({"auth_token": "t0k"}, "/sse/stream", {"Authorization": "Bearer t0k"}, 200),
        ({"allowed_origins": frozenset({"https://app.example.com"})}, "/sse/stream",
         {"Origin": "https://app.example.com"}, 200),
    ],
)  # fmt: skip
async def test_admission_is_the_websockets(
    nats_server: NatsServer,
    overrides: dict[str, object],
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    """Foreign Origin 403, missing or wrong token 401, else the stream (200)."""
    async with (
        running_gateway(make_settings(nats_server.url, **overrides)) as gw,
        httpx.AsyncClient() as http,
        http.stream("GET", http_url(gw, path), headers=headers) as response,
    ):
        assert response.status_code == status
        if status == 200 and "Origin" in headers:
            assert response.headers["access-control-allow-origin"] == headers["Origin"]


async def test_capacity_is_shared_with_websockets_and_full_means_503(
    nats_server: NatsServer,
) -> None:
    """One slot taken by a WebSocket client: the event stream gets 503 with Retry-After."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, max_connections=1)
    async with (
        running_gateway(settings, registry) as gw,
        websockets.connect(ws_url(gw)),
        httpx.AsyncClient() as http,
    ):
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the WebSocket")
        response = await http.get(http_url(gw, "/sse/stream"))
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
    assert sample(registry, "gateway_connections_rejected_total", {"reason": "capacity"}) == 1


async def test_event_stream_clients_are_counted_by_transport(nats_server: NatsServer) -> None:
    """SSE clients count in gateway_connections_active and under transport="sse"."""
    registry = CollectorRegistry()
    async with running_gateway(make_settings(nats_server.url), registry) as gw:
        async with events(gw), websockets.connect(ws_url(gw)):
            await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
            assert sample(registry, "gateway_connections_active") == 2
            for transport in ("sse", "websocket"):
                labels = {"transport": transport}
                assert sample(registry, "gateway_connections_by_transport", labels) == 1
        await wait_until(lambda: not gw.hub.active_connections, what="both gone")
        assert sample(registry, "gateway_connections_by_transport", {"transport": "sse"}) == 0
    assert sample(registry, "gateway_connections_closed_total", {"reason": "client"}) == 2


async def test_a_stalled_reader_is_dropped_after_the_send_timeout(nats_server: NatsServer) -> None:
    """An event-stream client that never reads is dropped alone, its socket released."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, send_timeout_s=0.5)
    async with (
        running_gateway(settings, registry) as gw,
        jetstream(nats_server.url) as js,
        events(gw) as healthy,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", gw.port))
        stalled.sendall(b"GET /sse/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
            for n in range(30):
                await publish_json(js, {"n": n, "pad": "x" * 200_000})
                assert (await healthy.next())["data"].startswith(f'{{"n":{n},')
            await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the drop")
        finally:
            stalled.close()
    closed = {"reason": "send_timeout"}
    assert sample(registry, "gateway_connections_closed_total", closed) == 1


async def test_shutdown_ends_the_stream(nats_server: NatsServer) -> None:
    """On shutdown the response ends (within the drain), counted as `shutdown`."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, drain_s=0.5)
    async with running_gateway(settings, registry) as gw:
        client = httpx.AsyncClient(timeout=seconds(30))
        response = await client.send(
            client.build_request("GET", http_url(gw, "/sse/stream")), stream=True
        )
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
    # The gateway is gone: the stream must have ended, not been cut.
    body = await asyncio.wait_for(response.aread(), seconds(5))
    assert body.startswith(b"retry:")
    await response.aclose()
    await client.aclose()
    assert sample(registry, "gateway_connections_closed_total", {"reason": "shutdown"}) == 1
