"""Every use of uvicorn's internals, in one place: the protocol classes and the server.

uvicorn's public surface is `uvicorn.Config` and `uvicorn.Server.serve`; the gateway needs
four things it does not offer, each done here by subclassing, each internal name used
commented on why. pyproject.toml pins uvicorn to the minor these were written against,
and tests (test_relay.py, test_handshake.py, test_shutdown.py, test_compression.py)
fail if a release changes them, so an upgrade cannot silently fall back.

1. Frames built once for everyone (`DirectWriteProtocol`). Through ASGI every
   `websocket.send` is encoded and framed again per connection; server frames are not
   masked, so a text frame's bytes are the same for every client. The protocol offers
   itself in the connection's ASGI scope (extension `gateway.direct_write`); the hub
   hands it the frame built once per message, and it writes it straight to the transport
   when the connection is open and its buffer has room, else declines (ASGI send).
   With `GATEWAY_WS_COMPRESSION=on` it negotiates permessage-deflate such that one
   compressed frame serves everyone: `server_no_context_takeover` always, the full
   window (an offer limiting `server_max_window_bits` is declined), and
   `client_no_context_takeover`, so no inflater lives per connection. Inbound compressed
   frames are inflated by websockets under `GATEWAY_MAX_INBOUND_BYTES` (1009 for a bomb).
   It also aborts connections it must let go of: uvicorn's `transport.close()` waits
   for the write buffer to drain, forever when the peer stopped reading.
2. A deadline for request heads (`handshake_deadline`): uvicorn times out idle
   keep-alive connections, not a request that never completes (slowloris).
3. Our goodbye before uvicorn's shutdown, and exit 0 after a signal (`GatewayServer`).
4. An abort handle for HTTP responses that live long (the event stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import NegotiationError
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import ExtensionParameter

EXTENSION = "gateway.direct_write"
ABORT = "gateway.abort"  # HTTP scope extension: abort the connection's transport


class SharedDeflateFactory(ServerPerMessageDeflateFactory):
    """permessage-deflate on terms that let one compressed frame serve every client."""

    def __init__(self) -> None:
        super().__init__(server_no_context_takeover=True, client_no_context_takeover=True)

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        for name, value in params:
            if name == "server_max_window_bits" and value is not None and value != "15":
                # Our frame is compressed once, with a 32 KiB window (RFC 7692 §7.1.2.1).
                raise NegotiationError(f"declined server_max_window_bits={value}")
        return super().process_request_params(params, accepted_extensions)


class DirectWriteProtocol(WebSocketsSansIOProtocol):
    """websockets-sansio, with `write_frame` for prebuilt server frames."""

    compression = False
    """Offer permessage-deflate (set on a subclass by `protocol_class`)."""
    deflate = False
    """True when this connection negotiated permessage-deflate: it gets compressed frames."""
    ping_timed_out = False
    """Set when the peer missed a pong and the connection was aborted for it."""
    direct_writes = 0
    """Frames this connection took by direct write (tests assert the path is taken)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.compression:  # uvicorn's own deflate keeps a context per client: ours not
            self.conn = ServerProtocol(
                extensions=[SharedDeflateFactory()],
                max_size=self.config.ws_max_size,
                logger=logging.getLogger("uvicorn.error"),
            )

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        self.deflate = any(isinstance(e, PerMessageDeflate) for e in self.conn.extensions)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # uvicorn leaves this unset after an HTTP refusal (401/403/503), then logs an
            # ERROR "returned without completing handshake" for every refused client.
            self.handshake_complete = True

    def write_frame(self, frame: bytes) -> bool:
        """Write a complete server frame now if nothing stands in the way; else False."""
        # uvicorn internals: handshake_complete / close_sent / disconnected /
        # initial_response are its own state flags (a frame may go out only on an open,
        # accepted connection that is not closing); writable is its flow control (cleared
        # while the transport's buffer is over the high-water mark); conn is the websockets
        # ServerProtocol (its state machine says OPEN); transport is asyncio's.
        if (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        ):
            self.transport.write(frame)
            self.direct_writes += 1
            return True
        return False

    def abort(self) -> None:
        """Drop the connection now, discarding whatever is still buffered for the peer."""
        self.transport.abort()

    def keepalive_timeout(self) -> None:
        """A peer that missed its ping is gone: abort rather than wait for a buffer drain.

        uvicorn closes the transport gracefully, and with a full write buffer (a peer that
        vanished mid-stream) that close, and the app's disconnect, would wait forever.
        """
        self.ping_timed_out = True
        super().keepalive_timeout()
        self.transport.abort()


def protocol_class(*, compression: bool) -> type[DirectWriteProtocol]:
    """The protocol class for uvicorn's `ws=`, offering compression or not."""
    if not compression:
        return DirectWriteProtocol
    return type("DeflatingDirectWriteProtocol", (DirectWriteProtocol,), {"compression": True})


class GatewayServer(uvicorn.Server):
    """uvicorn, with our goodbye before its shutdown and a clean exit on signals."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._on_shutdown()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the captured signal after a graceful shutdown, which makes the
        # process exit 143/130. A drained gateway has done its job: it exits 0.
        # uvicorn internal: _captured_signals, the list it re-raises from.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def handshake_deadline(timeout_s: float, on_timeout: Callable[[], None]) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with a deadline for the request head (slowloris guard).

    uvicorn times out idle keep-alive connections but not a request that never completes:
    a peer could hold a socket open forever by sending nothing, or a byte at a time. This
    closes a connection whose request head has not arrived within `timeout_s` of the
    connection (or of that request's first byte).
    """

    class HandshakeDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_deadline()

        def on_message_begin(self) -> None:
            # Every request head gets the deadline, not only the first: a kept-alive
            # connection's next request could otherwise trickle in forever.
            super().on_message_begin()
            self._arm_deadline()
            # A long-lived response (the event stream) whose client stalled must be able to
            # let go of its socket: close() would wait for a buffer the peer never reads.
            # uvicorn internal: self.scope is the dict the app gets; it has no extensions.
            self.scope["extensions"] = {ABORT: self.transport.abort}  # type: ignore[dict-item]

        def _arm_deadline(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        # uvicorn internals: connection_made / on_message_begin / on_headers_complete /
        # connection_lost are its asyncio and httptools callbacks; loop is its event loop.
        def on_headers_complete(self) -> None:
            self._cancel_deadline()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                on_timeout()
                self.transport.close()

    return HandshakeDeadline
