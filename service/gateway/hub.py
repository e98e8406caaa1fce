"""The hub: connected clients and the fan-out of frames to them.

This is the seed's `SocketBroadcaster`. Broadcasting is synchronous and O(clients): it
puts the new frame into each client's one-slot mailbox ("latest wins") and wakes that
client's writer. It never awaits a socket, so one slow or dead client cannot delay the
others. Each client's writer sends the newest frame under a send timeout; a frame that
was replaced before it was sent is counted as conflated. A client whose send stalls past
the timeout is dropped, alone.

Needs nothing but the standard library and our metrics: sockets come in through `Sink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.metrics import Metrics
from gateway.payload import Frame

log = logging.getLogger(__name__)

WS_1001_GOING_AWAY = 1001
CLOSE_TICK_S = 0.05  # shutdown closes clients in batches, one batch per tick


class Sink(Protocol):
    """Where a client's frames go: a WebSocket, or a fake in unit tests."""

    async def send_text(self, text: str) -> None:
        """Send one text frame; may block while the peer is not reading."""

    async def close(self, code: int) -> None:
        """Send a close frame with `code`."""


class Client:
    """One connected client: its sink, its one-slot mailbox and its wake-up signal."""

    __slots__ = ("_close_code", "_closed", "_pending", "_wakeup", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._pending: Frame | None = None
        self._closed = False
        self._close_code: int | None = None
        self._wakeup = asyncio.Event()

    def offer(self, frame: Frame) -> bool:
        """Put `frame` in the mailbox; return True if it replaced an unsent one."""
        replaced = self._pending is not None
        self._pending = frame
        self._wakeup.set()
        return replaced

    def request_close(self, code: int | None) -> None:
        """Stop the writer: send a close frame with `code` first, unless None (peer gone)."""
        self._closed = True
        self._close_code = code
        self._wakeup.set()


class SocketBroadcaster:
    """Connected clients, the cached latest frame, and the fan-out between them."""

    def __init__(
        self, metrics: Metrics, send_timeout_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.send_timeout_s = send_timeout_s
        self.clock = clock
        self.active_connections: set[Client] = set()
        self.latest: Frame | None = None
        """The cached latest frame, sent to every new client at once."""
        self.closing = False
        """True once shutdown began: no new clients are taken."""
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def latest_payload(self) -> str | None:
        """The seed's `_latest_payload`: the newest relayed payload, as sent."""
        return self.latest.text if self.latest else None

    def connect(self, sink: Sink) -> Client:
        """Register an accepted socket; its mailbox starts with the cached frame, if any."""
        client = Client(sink)
        if self.latest is not None:
            client.offer(self.latest)
        self.active_connections.add(client)
        self._empty.clear()
        self.metrics.connections_total.inc()
        self.metrics.connections_active.set(len(self.active_connections))
        return client

    def disconnect(self, client: Client) -> None:
        """Forget a client. Idempotent."""
        self.active_connections.discard(client)
        self.metrics.connections_active.set(len(self.active_connections))
        if not self.active_connections:
            self._empty.set()

    def broadcast(self, frame: Frame) -> int:
        """Cache `frame`, put it in every client's mailbox; return how many it replaced.

        Never awaits a socket.
        """
        started = time.perf_counter()
        self.latest = frame
        conflated = 0
        for client in self.active_connections:
            conflated += client.offer(frame)
        if conflated:
            self.metrics.messages_conflated.inc(conflated)
        self.metrics.broadcast_duration.observe(time.perf_counter() - started)
        return conflated

    async def serve(self, client: Client) -> None:
        """Write `client`'s frames until it is closed or fails; the caller disconnects it."""
        metrics, timeout = self.metrics, self.send_timeout_s
        while True:
            await client._wakeup.wait()
            client._wakeup.clear()
            if client._closed:
                if client._close_code is not None:
                    await self._say_goodbye(client, client._close_code)
                return
            frame, client._pending = client._pending, None
            if frame is None:
                continue
            try:
                async with asyncio.timeout(timeout):
                    await client.sink.send_text(frame.text)
            except TimeoutError:
                metrics.send_failures.inc()
                log.warning("client dropped: a send stalled for more than %ss", timeout)
                return
            except OSError:  # the peer went away mid-send (uvicorn's ClientDisconnected)
                metrics.send_failures.inc()
                return
            metrics.messages_sent.inc()
            metrics.delivery_lag.observe(max(0.0, self.clock() - frame.published_at))

    async def _say_goodbye(self, client: Client, code: int) -> None:
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await client.sink.close(code)
        except (TimeoutError, OSError):
            pass  # it stalled or left; the connection ends when the handler returns

    async def close(self, code: int = WS_1001_GOING_AWAY, spread_s: float = 0.0) -> None:
        """Stop taking clients, close every client with `code` over `spread_s` seconds.

        Spreading the closes keeps clients that reconnect to other replicas from arriving
        all in the same instant. Returns once every client is gone, or after the spread
        plus one send timeout.
        """
        self.closing = True
        clients = list(self.active_connections)
        if not clients:
            return
        log.info("closing %d clients with code %d over %.1fs", len(clients), code, spread_s)
        batches = max(1, min(len(clients), round(spread_s / CLOSE_TICK_S)))
        size = -(-len(clients) // batches)  # ceiling division
        for start in range(0, len(clients), size):
            if start:
                await asyncio.sleep(spread_s / batches)
            for client in clients[start : start + size]:
                client.request_close(code)
        try:
            async with asyncio.timeout(self.send_timeout_s + 1.0):
                await self._empty.wait()
        except TimeoutError:
            log.warning("%d clients still open after shutdown", len(self.active_connections))
