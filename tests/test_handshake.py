"""Admission at the handshake, over real sockets: origin 403, token 401, capacity 1013, 1009."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from prometheus_client import CollectorRegistry
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.natsserver import NatsServer

from conftest import make_settings, running_gateway, seconds, wait_until, ws_url

pytestmark = pytest.mark.anyio

ALLOWED = "https://app.example.com"


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("gateway_connections_rejected_total", {"reason": reason}) or 0


async def handshake_status(url: str, **kwargs: object) -> int:
    """101 if the handshake succeeds, else the HTTP status the server answered."""
    try:
        async with websockets.connect(url, **kwargs):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (ALLOWED, 101),
        ("HTTPS://APP.EXAMPLE.COM", 101),
        ("https://app.example.com:443", 101),
        (None, 101),  # not a browser: the origin rule does not apply (SPEC)
        ("https://evil.example.com", 403),
        ("http://app.example.com", 403),
        ("https://app.example.com:8443", 403),
        ("https://app.example.com.evil.com", 403),
        ("null", 403),
        ("", 403),
    ],
)
async def test_origin_allow_list_at_handshake(
    nats_server: NatsServer, origin: str | None, status: int
) -> None:
    """With an allow-list, a foreign Origin gets HTTP 403 before any WebSocket is accepted."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, allowed_origins=frozenset({ALLOWED}))
    async with running_gateway(settings, registry) as gw:
        headers = {} if origin is None else {"Origin": origin}
        kwargs = {"origin": origin} if origin else {"additional_headers": headers}
        assert await handshake_status(ws_url(gw), **kwargs) == status
    assert rejected(registry, "origin") == (1 if status == 403 else 0)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/ws/stream?token=t0ken", {}, 101),
        ("/ws/stream", {"Authorization": "Bearer t0ken"}, 101),
        ("/ws/stream", {"Authorization": "bearer t0ken"}, 101),
        ("/ws/stream", {}, 401),
        ("/ws/stream?token=wrong", {}, 401),
        ("/ws/stream?token=", {}, 401),
        ("/ws/stream", {"Authorization": "Basic t0ken"}, 401),
        ("/ws/stream?token=t0ke", {}, 401),
    ],
)
async def test_token_required_when_configured(
    nats_server: NatsServer, path: str, headers: dict[str, str], status: int
) -> None:
    """With GATEWAY_AUTH_TOKEN, a missing or wrong token gets HTTP 401 at the handshake."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, auth_token="t0ken")
    async with running_gateway(settings, registry) as gw:
        url = ws_url(gw, path)
        assert await handshake_status(url, additional_headers=headers) == status
    assert rejected(registry, "auth") == (1 if status == 401 else 0)


async def test_over_capacity_is_accepted_then_closed_1013(nats_server: NatsServer) -> None:
    """Beyond GATEWAY_MAX_CONNECTIONS a client is closed with 1013; the others stay."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, max_connections=2)
    async with (
        running_gateway(settings, registry) as gw,
        websockets.connect(ws_url(gw)) as first,
        websockets.connect(ws_url(gw)),
    ):
        await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
        async with websockets.connect(ws_url(gw)) as third:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(third.recv(), seconds(5))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013
        assert rejected(registry, "capacity") == 1
        assert len(gw.hub.active_connections) == 2
        await first.ping()


async def test_oversized_inbound_frame_closes_only_that_client_1009(
    nats_server: NatsServer,
) -> None:
    """An inbound frame over GATEWAY_MAX_INBOUND_BYTES closes that client with 1009."""
    settings = make_settings(nats_server.url, max_inbound_bytes=1024)
    async with (
        running_gateway(settings) as gw,
        websockets.connect(ws_url(gw)) as bystander,
        websockets.connect(ws_url(gw)) as offender,
    ):
        await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
        await offender.send("small frames are ignored")
        await offender.send("x" * 2048)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(offender.recv(), seconds(5))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the removal")
        await bystander.ping()


@pytest.mark.parametrize("sent", [b"", b"GET /ws/stream HTTP/1.1\r\nHost: x\r\n"])
async def test_connection_without_a_complete_request_is_closed(
    nats_server: NatsServer, sent: bytes
) -> None:
    """A peer that never finishes its request head is closed after the handshake timeout."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, handshake_timeout_s=0.3)
    async with running_gateway(settings, registry) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(sent)  # nothing, or a request head that never ends
        assert await asyncio.wait_for(reader.read(), seconds(5)) == b"", "closed by the server"
        writer.close()
        async with websockets.connect(ws_url(gw)):  # a real client is unaffected
            pass
    assert rejected(registry, "handshake_timeout") == 1
