"""`GET /sse/stream`: the same stream as `/ws/stream`, as Server-Sent Events.

For clients behind networks or proxies that break WebSockets. Each message is one event,
`id:` its JetStream stream sequence and one `data:` line per line of the payload, built
once per message for every client (`Frame.event`). The client is a hub client like any
WebSocket: the cached payload first, then every later one in order, conflation when it
reads slowly, dropped when a send stalls past the send timeout, closed (the response
ends) on shutdown within the drain window. Admission is the WebSocket's: a foreign
`Origin` gets 403, a missing or wrong token 401, and a full or draining gateway 503 with
`Retry-After`. A comment line every KEEPALIVE_S keeps idle proxies from closing it.

A raw ASGI handler: the hub writes each event with one `http.response.body` send,
started inside the fan-out, exactly as it does for WebSockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.admission import scope_headers, scope_refusal
from gateway.hub import SocketBroadcaster
from gateway.metrics import Metrics
from gateway.payload import Frame
from gateway.settings import Settings
from gateway.uvicorn_seam import ABORT

KEEPALIVE_S = 15.0  # under the 30-60 s idle timeouts common in proxies and load balancers
RETRY_MS = 2000  # the browser's reconnect delay (EventSource reconnects on its own)
RETRY_AFTER_S = 5  # told to clients refused for capacity or shutdown

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class EventStreamSink:
    """The hub's view of one event-stream response."""

    __slots__ = ("_abort", "_send", "ended")

    def __init__(self, send: Send, abort: Callable[[], None] | None) -> None:
        self._send = send
        self._abort = abort
        self.ended = False

    def write_now(self, frame: Frame) -> bool:
        return False  # always the ASGI send: HTTP chunking is the server's business

    async def send(self, frame: Frame) -> None:
        await self.write(frame.event())

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def close(self, code: int) -> None:
        """End the response (the WebSocket's close code has no equivalent here)."""
        self.ended = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def abort(self) -> None:
        """Release the socket of a dropped client now, whatever is still buffered."""
        if self._abort is not None:
            self._abort()


async def _respond(send: Send, status: int, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def event_stream(
    settings: Settings, hub: SocketBroadcaster, metrics: Metrics
) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """The ASGI handler of `/sse/stream`."""

    async def handle(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = scope_headers(scope)
        retry_after = [(b"retry-after", str(RETRY_AFTER_S).encode())]
        if hub.closing:
            metrics.connections_rejected.labels("draining").inc()
            return await _respond(send, 503, retry_after)
        reason = scope_refusal(settings, scope, headers)
        if reason is not None:
            metrics.connections_rejected.labels(reason.value).inc()
            return await _respond(send, reason.status, [])
        if len(hub.active_connections) >= settings.max_connections:
            metrics.connections_rejected.labels("capacity").inc()
            return await _respond(send, 503, retry_after)
        response_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: pass events through unbuffered
        ]
        if "origin" in headers:  # a cross-origin EventSource needs it (admitted above)
            response_headers += [
                (b"access-control-allow-origin", headers["origin"].encode("latin-1")),
                (b"vary", b"origin"),
            ]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        sink = EventStreamSink(send, (scope.get("extensions") or {}).get(ABORT))
        await sink.write(f"retry: {RETRY_MS}\n\n".encode())
        metrics.connections_by_transport.labels("sse").inc()
        client = hub.connect(sink)
        reason_closed = "client"
        try:
            # A client the hub drops has its connection aborted, which ends this wait.
            reason_closed = await _serve(receive, sink, hub.send_timeout_s)
        finally:
            hub.disconnect(client)
            metrics.connections_by_transport.labels("sse").dec()
            metrics.connections_closed.labels(client.reason or reason_closed).inc()

    return handle


async def _serve(receive: Receive, sink: EventStreamSink, timeout_s: float) -> str:
    """Wait for the client to leave, writing a keepalive comment when it is quiet."""
    while not sink.ended:
        try:
            message = await asyncio.wait_for(receive(), KEEPALIVE_S)
        except TimeoutError:
            try:
                async with asyncio.timeout(timeout_s):
                    await sink.write(b": keepalive\n\n")
            except TimeoutError:
                return "send_timeout"
            except OSError:
                return "client"
            continue
        if message["type"] == "http.disconnect":
            return "client"
    with contextlib.suppress(Exception):  # shutdown ended the response: wait for the end
        while (await receive())["type"] != "http.disconnect":
            pass
    return "shutdown"
