"""permessage-deflate, compressed once per message for every client that negotiated it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import zlib
from collections.abc import AsyncIterator

import msgspec
import pytest
import websockets
from prometheus_client import CollectorRegistry
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from gateway.natsserver import NatsServer
from gateway.server import Gateway

from conftest import (
    jetstream,
    make_settings,
    publish_json,
    recv_json,
    running_gateway,
    sample,
    seconds,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio

BROWSER_OFFER = "permessage-deflate; client_max_window_bits"  # what Chromium sends


class RawClient:
    """A WebSocket client on a bare socket: sees the handshake and every frame's bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.extensions = ""

    async def handshake(self, port: int, offer: str | None) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        extension = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        self.writer.write(
            f"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extension}\r\n".encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), seconds(5))
        assert head.startswith(b"HTTP/1.1 101"), head
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                self.extensions = value.strip()

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: its first byte (FIN, RSV1-3, opcode) and its raw payload."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), seconds(5))
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        return first, await self.reader.readexactly(size)


@contextlib.asynccontextmanager
async def raw_client(gw: Gateway, offer: str | None) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    client = RawClient(reader, writer)
    try:
        await client.handshake(gw.port, offer)
        yield client
    finally:
        writer.close()


def inflate(data: bytes) -> bytes:
    """What a client does with a message sent with server_no_context_takeover."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data + b"\x00\x00\xff\xff")


PAYLOAD = {"spy": {"spot": 600.25}, "levels": [{"price": 601.5, "kind": "support"}] * 40}


async def test_offering_clients_share_one_compressed_frame_others_get_plain(
    nats_server: NatsServer,
) -> None:
    """Two clients that offer deflate get byte-identical RSV1 frames that inflate to the
    payload; a client that offers nothing gets the plain frame."""
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
        raw_client(gw, BROWSER_OFFER) as first,
        raw_client(gw, BROWSER_OFFER) as second,
        raw_client(gw, None) as plain,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await wait_until(lambda: len(gw.hub.active_connections) == 3, what="three clients")
        for client in (first, second):
            offered = {p.strip() for p in client.extensions.split(";")}
            assert offered == {
                "permessage-deflate",
                "server_no_context_takeover",
                "client_no_context_takeover",
            }
        assert plain.extensions == ""
        await publish_json(js, PAYLOAD)
        raw = msgspec.json.encode(PAYLOAD)  # the bytes published_json put on NATS
        (head1, body1), (head2, body2) = await first.frame(), await second.frame()
        assert head1 == head2 == 0xC1, "FIN + RSV1 + text"
        assert body1 == body2, "compressed once: the same bytes for both"
        assert inflate(body1) == raw
        assert len(body1) * 3 < len(raw), "at least 3x fewer bytes on the wire"
        head, body = await plain.frame()
        assert (head, body) == (0x81, raw)


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; server_max_window_bits=9; client_max_window_bits",
    ],
)
async def test_an_offer_limiting_the_servers_window_is_declined(
    nats_server: NatsServer, offer: str
) -> None:
    """We compress once with a 32 KiB window: an offer that forbids it gets no deflate."""
    async with running_gateway(make_settings(nats_server.url)) as gw, raw_client(gw, offer) as c:
        assert c.extensions == ""


async def test_a_fallback_offer_is_taken_when_the_first_is_declined(
    nats_server: NatsServer,
) -> None:
    """Of two offers, the first limiting our window, the second (acceptable) one wins."""
    offer = "permessage-deflate; server_max_window_bits=10, permessage-deflate"
    async with running_gateway(make_settings(nats_server.url)) as gw, raw_client(gw, offer) as c:
        assert c.extensions.startswith("permessage-deflate")
        assert "server_max_window_bits" not in c.extensions


async def test_compression_off_negotiates_nothing(nats_server: NatsServer) -> None:
    """GATEWAY_WS_COMPRESSION=off: a deflate offer is ignored, frames go out plain."""
    settings = make_settings(nats_server.url, ws_compression=False)
    async with running_gateway(settings) as gw, raw_client(gw, BROWSER_OFFER) as c:
        assert c.extensions == ""


async def test_websockets_library_with_deflate_reads_every_payload(
    nats_server: NatsServer,
) -> None:
    """The `websockets` client with its default compression gets every payload, in order."""
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
        websockets.connect(ws_url(gw), compression="deflate") as ws,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
        for n in range(20):
            await publish_json(js, {**PAYLOAD, "n": n})
        assert [(await recv_json(ws))["n"] for _ in range(20)] == list(range(20))


async def test_a_deflate_bomb_gets_1009_and_nobody_else_notices(nats_server: NatsServer) -> None:
    """An inbound compressed frame is limited by its inflated size: 1009 for that client."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, max_inbound_bytes=65_536)
    bomb_factory = ClientPerMessageDeflateFactory()
    async with (
        running_gateway(settings, registry) as gw,
        jetstream(nats_server.url) as js,
        websockets.connect(ws_url(gw), compression="deflate") as bystander,
        websockets.connect(
            ws_url(gw), extensions=[bomb_factory], compression=None, max_size=None
        ) as bomber,
    ):
        await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
        await bomber.send("0" * 4_000_000)  # ~4 KB on the wire, 4 MB inflated
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(bomber.recv(), seconds(5))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        await publish_json(js, {"still": "here"})
        assert await recv_json(bystander) == {"still": "here"}
    assert sample(registry, "gateway_connections_closed_total", {"reason": "too_big"}) == 1
