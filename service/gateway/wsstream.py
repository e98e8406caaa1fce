"""`/ws/stream`: the WebSocket transport of the stream (sse.py is the other).

The handshake: refuse while draining (503), a foreign Origin (403) or a missing or wrong
token (401), all before accepting; accept, then close with 1013 over capacity. A short
SERVER span covers it when tracing is on. Then the connection is a hub client: the hub
writes to it from the fan-out, and this task only reads (and ignores) what the client
sends until it leaves, then counts why it ended (metrics.CLOSE_REASONS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.status_codes import (
    HTTP_101_SWITCHING_PROTOCOLS,
    HTTP_503_SERVICE_UNAVAILABLE,
    WS_1009_MESSAGE_TOO_BIG,
    WS_1013_TRY_AGAIN_LATER,
)
from opentelemetry import trace

from gateway import uvicorn_seam
from gateway.admission import scope_headers, scope_refusal
from gateway.client import Client
from gateway.hub import SocketBroadcaster
from gateway.metrics import Metrics
from gateway.payload import Frame
from gateway.settings import Settings
from gateway.uvicorn_seam import DirectWriteProtocol

Outcome = Callable[[int, str], None]


class SocketSink:
    """The hub's view of a WebSocket: raw ASGI sends, the same `str` for every client."""

    __slots__ = ("_direct", "_send")

    def __init__(self, socket: WebSocket[Any, Any, Any]) -> None:
        self._send = socket.send
        direct = (socket.scope.get("extensions") or {}).get(uvicorn_seam.EXTENSION)
        self._direct = direct if isinstance(direct, DirectWriteProtocol) else None

    def write_now(self, frame: Frame) -> bool:
        direct = self._direct
        return direct is not None and direct.write_frame(frame.websocket(deflate=direct.deflate))

    def abort(self) -> None:
        """Release the socket of a dropped client now (see uvicorn_seam.DirectWriteProtocol)."""
        if self._direct is not None:
            self._direct.abort()

    @property
    def ping_timed_out(self) -> bool:
        return self._direct is not None and self._direct.ping_timed_out

    async def send(self, frame: Frame) -> None:
        try:
            await self._send({"type": "websocket.send", "text": frame.text, "bytes": None})
        except WebSocketDisconnect:  # Litestar's word for "the peer already left"
            raise ConnectionResetError from None

    async def close(self, code: int) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": None})
        except WebSocketDisconnect:
            raise ConnectionResetError from None


async def _refuse(socket: WebSocket[Any, Any, Any], status: int) -> None:
    """Answer the handshake with an HTTP error status (403 where the server can't do more)."""
    if "websocket.http.response" in (socket.scope.get("extensions") or {}):
        await socket.send(
            {"type": "websocket.http.response.start", "status": status, "headers": []}
        )
        await socket.send({"type": "websocket.http.response.body", "body": b"", "more_body": False})
    else:
        await socket.send({"type": "websocket.close", "code": 1008, "reason": None})


async def _read_until_disconnect(socket: WebSocket[Any, Any, Any]) -> int:
    """Inbound frames are ignored; the server's max frame size closes oversize ones (1009).

    Returns the close code of the disconnect.
    """
    while (message := await socket.receive())["type"] != "websocket.disconnect":
        pass
    return int(message.get("code", 1005))


def _close_reason(client: Client, sink: SocketSink, code: int | None) -> str:
    """Why a connection ended (metrics.CLOSE_REASONS)."""
    if client.reason is not None:
        return client.reason  # the hub ended it: a stalled or failed send, or shutdown
    if sink.ping_timed_out:
        return "ping_timeout"
    if code == WS_1009_MESSAGE_TOO_BIG:
        return "too_big"
    return "client"


@contextlib.contextmanager
def _handshake_span(
    tracer: trace.Tracer | None, scope: Any
) -> Iterator[Callable[[int, str], None]]:
    """A SERVER span for a WebSocket handshake that ends at accept (or refusal).

    Litestar's plugin would keep one span open for the socket's whole life: hours, times
    every client. This one lasts the handshake and says how it ended. It records the
    path, never the query string (a client's token).
    """
    if tracer is None:
        yield lambda status, outcome: None
        return
    attributes = {
        "url.path": scope["path"],
        "url.scheme": "ws",
        "network.protocol.name": "websocket",
    }
    with tracer.start_as_current_span(
        f"WS {scope['path']}", kind=trace.SpanKind.SERVER, attributes=attributes
    ) as span:

        def outcome(status: int, result: str) -> None:
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("gateway.handshake.result", result)

        yield outcome


def websocket_stream(
    settings: Settings, hub: SocketBroadcaster, metrics: Metrics, tracer: trace.Tracer | None
) -> Callable[[WebSocket[Any, Any, Any]], Awaitable[None]]:
    """The `/ws/stream` handler body, serving `hub`."""

    async def handshake(socket: WebSocket[Any, Any, Any], outcome: Outcome) -> bool:
        """Admit (accept) or refuse a client; True if it may stay."""
        await socket.receive()  # websocket.connect
        if hub.closing:
            metrics.connections_rejected.labels("draining").inc()
            outcome(HTTP_503_SERVICE_UNAVAILABLE, "draining")
            await _refuse(socket, HTTP_503_SERVICE_UNAVAILABLE)
            return False
        reason = scope_refusal(settings, socket.scope, scope_headers(socket.scope))
        if reason is not None:
            metrics.connections_rejected.labels(reason.value).inc()
            outcome(reason.status, reason.value)
            await _refuse(socket, reason.status)
            return False
        # Litestar's accept() would wait for websocket.connect, which we already read.
        await socket.send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        if len(hub.active_connections) >= settings.max_connections:
            metrics.connections_rejected.labels("capacity").inc()
            metrics.connections_closed.labels("capacity").inc()
            outcome(HTTP_101_SWITCHING_PROTOCOLS, "capacity")
            await socket.close(WS_1013_TRY_AGAIN_LATER, "gateway at capacity")
            return False
        outcome(HTTP_101_SWITCHING_PROTOCOLS, "accepted")
        return True

    async def stream(socket: WebSocket[Any, Any, Any]) -> None:
        with _handshake_span(tracer, socket.scope) as outcome:
            if not await handshake(socket, outcome):
                return
        # This task only reads (and ignores) what the client sends, until it leaves: the
        # hub writes to the socket from the fan-out. A client the hub drops (a send
        # stalled or failed) has its connection aborted, which ends this read too.
        sink = SocketSink(socket)
        metrics.connections_by_transport.labels("websocket").inc()
        client = hub.connect(sink)
        code: int | None = None
        try:
            code = await _read_until_disconnect(socket)
        except WebSocketDisconnect as exc:
            code = exc.code
        finally:
            hub.disconnect(client)
            metrics.connections_by_transport.labels("websocket").dec()
            metrics.connections_closed.labels(_close_reason(client, sink, code)).inc()

    return stream
