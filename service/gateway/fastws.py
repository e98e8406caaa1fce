"""uvicorn's WebSocket protocol, plus one way in for frames built once for everyone.

Through ASGI every `websocket.send` is encoded and framed again for each connection. For a
broadcast that is the same work thousands of times: server frames are not masked and
compression is off, so a text frame's bytes are identical for every client. This
subclass of uvicorn's websockets-sansio protocol puts itself in the connection's ASGI
scope (extension `gateway.direct_write`); the hub hands it the frame built once per
message, and it writes it straight to the transport when the connection is open and its
buffer has room. In every other case it declines and the ordinary ASGI send is used.

It also lets the gateway abort a connection it dropped: uvicorn ends a connection with
`transport.close()`, which waits for the write buffer to drain, which is forever when
the peer stopped reading, so the socket and its buffers would never be released.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

EXTENSION = "gateway.direct_write"


class DirectWriteProtocol(WebSocketsSansIOProtocol):
    """websockets-sansio, with `write_frame` for prebuilt server frames."""

    ping_timed_out = False
    """Set when the peer missed a pong and the connection was aborted for it."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = self

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
