"""uvicorn's WebSocket protocol, plus one way in for frames built once for everyone.

Through ASGI every `websocket.send` is encoded and framed again for each connection. For a
broadcast that is the same work thousands of times: server frames are not masked and
compression is off, so a text frame's bytes are identical for every client. This
subclass of uvicorn's websockets-sansio protocol puts itself in the connection's ASGI
scope (extension `gateway.direct_write`); the hub hands it the frame built once per
message, and it writes it straight to the transport when the connection is open and its
buffer has room. In every other case it declines and the ordinary ASGI send is used.

With `GATEWAY_WS_COMPRESSION=on` it negotiates permessage-deflate (RFC 7692) such that
one compressed frame serves everyone: the server never keeps a compression context
(`server_no_context_takeover`, always in the response) and uses the full window, so an
offer that limits `server_max_window_bits` is declined; the client is asked not to keep
one either (`client_no_context_takeover`), so no inflater lives per connection. Inbound
compressed frames are inflated by websockets under `GATEWAY_MAX_INBOUND_BYTES` (a deflate
bomb gets 1009).

It also lets the gateway abort a connection it dropped: uvicorn ends a connection with
`transport.close()`, which waits for the write buffer to drain, which is forever when
the peer stopped reading, so the socket and its buffers would never be released.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

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
