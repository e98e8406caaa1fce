"""What the hub knows of one client: the `Sink` it writes through, and its send state.

The hub alone changes a client's state; transports (wsstream.py, sse.py) implement `Sink`
and read `Client.reason` when their connection ends.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.payload import Frame


class Sink(Protocol):
    """Where a client's frames go: a WebSocket, an event stream, or a fake in unit tests."""

    async def send(self, frame: Frame) -> None:
        """Send one frame through the server; may block while the peer is not reading."""

    async def close(self, code: int) -> None:
        """End the connection (a WebSocket close frame with `code`)."""

    def write_now(self, frame: Frame) -> bool:
        """Write the frame's prebuilt bytes at once if the socket takes them without waiting."""

    def abort(self) -> None:
        """End the connection now, discarding what is buffered; its handler then sees the
        peer leave (a stalled peer would keep a graceful close waiting forever)."""


class Client:
    """One connected client: its sink, its one-slot mailbox, its writer when it has one."""

    __slots__ = ("closed", "dropped", "pending", "reason", "sink", "writer")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pending: Frame | None = None
        """The newest frame not sent yet (one slot: a newer frame replaces it)."""
        self.writer: asyncio.Task[None] | None = None
        """Exists only while a send is in flight that could not complete at once."""
        self.closed = False
        """No more frames for it: it is leaving, or being closed."""
        self.dropped = False
        """True once the hub gave up on this client (a send failed or stalled)."""
        self.reason: str | None = None
        """Why the hub ended it (see metrics.CLOSE_REASONS); None while it did not."""
