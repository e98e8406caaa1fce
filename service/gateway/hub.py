"""The hub: connected clients and the fan-out of frames to them.

This is the seed's `SocketBroadcaster`. Broadcasting is synchronous and O(clients) and
never waits for a socket, so one slow or dead client cannot delay the others:

- A client that is idle (nothing in flight) gets the frame written at once: the frame's
  bytes are built once per message and written straight to its socket when the server
  offers that (`Sink.write_now`); otherwise the ASGI send is started inside the loop and,
  as long as the socket's buffer has room, completes without suspending. No task switch
  per client per frame, which is what makes the naive `for ws in clients: await
  ws.send(...)` loop fast, without its failure mode.
- If that send would block (the peer is not reading), it is handed, unfinished, to the
  client's own writer task, which finishes it under the send timeout.
- A client that is busy gets the frame in its one-slot mailbox ("latest wins"); a frame
  replaced there before it was sent is counted as conflated.
- A client whose send stalls past the timeout is dropped, alone.

Needs nothing but the standard library and our metrics: sockets come in through `Sink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Protocol

from gateway.metrics import Metrics, observe_many
from gateway.payload import Frame, websocket_text_frame

log = logging.getLogger(__name__)

WS_1001_GOING_AWAY = 1001
CLOSE_TICK_S = 0.05  # shutdown closes clients in batches, one batch per tick


class Sink(Protocol):
    """Where a client's frames go: a WebSocket, or a fake in unit tests."""

    async def send_text(self, text: str) -> None:
        """Send one text frame; may block while the peer is not reading."""

    async def close(self, code: int) -> None:
        """Send a close frame with `code`."""

    def write_now(self, wire: bytes) -> bool:
        """Write a prebuilt frame at once if the socket can take it without waiting."""


class Client:
    """One connected client: its sink, its one-slot mailbox and its writer's state."""

    __slots__ = ("_busy", "_close_code", "_closed", "_inflight", "_pending", "_wakeup", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._pending: Frame | None = None
        self._inflight: tuple[Frame, Awaitable[None]] | None = None
        """A send started by the fan-out that could not finish at once, for the writer."""
        self._busy = False
        """True while a send is in flight (started by the fan-out or by the writer)."""
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
        """Cache `frame` and deliver it to every client; return how many frames it replaced.

        Never waits for a socket: idle clients are written to directly, the others get the
        frame in their mailbox (see the module docstring).
        """
        started = time.perf_counter()
        self.latest = frame
        conflated = sent = 0
        wire = b""  # the frame's bytes on the wire, built once, when first needed
        for client in self.active_connections:
            if client._busy or client._pending is not None or client._closed:
                conflated += client.offer(frame)
                continue
            wire = wire or websocket_text_frame(frame.text.encode())
            if client.sink.write_now(wire):
                sent += 1
            else:
                sent += self._send_now(client, frame)
        metrics = self.metrics
        if sent:
            metrics.messages_sent.inc(sent)
            observe_many(metrics.delivery_lag, max(0.0, self.clock() - frame.published_at), sent)
        if conflated:
            metrics.messages_conflated.inc(conflated)
        metrics.broadcast_duration.observe(time.perf_counter() - started)
        return conflated

    def _send_now(self, client: Client, frame: Frame) -> bool:
        """Start writing `frame` to an idle client; True if it was written at once."""
        send = client.sink.send_text(frame.text)
        try:
            # One step of the coroutine: with room in the socket's buffer, the whole
            # send runs synchronously and ends here.
            waiting_on = send.send(None)
        except StopIteration:
            return True
        except (OSError, RuntimeError):  # the peer went away (uvicorn's ClientDisconnected)
            self.metrics.send_failures.inc()
            client.request_close(None)
            return False
        # The send would block: its writer task finishes it, under the send timeout.
        client._busy = True
        client._inflight = (frame, _resume(send, waiting_on))
        client._wakeup.set()
        return False

    async def serve(self, client: Client) -> None:
        """Write `client`'s frames until it is closed or fails; the caller disconnects it."""
        while True:
            await client._wakeup.wait()
            client._wakeup.clear()
            if client._closed:
                if client._inflight is not None:
                    _abandon(client._inflight[1])
                if client._close_code is not None:
                    await self._say_goodbye(client, client._close_code)
                return
            if client._inflight is not None:
                (frame, send), client._inflight = client._inflight, None
            elif client._pending is not None:
                frame, client._pending = client._pending, None
                send = client.sink.send_text(frame.text)
            else:
                continue
            client._busy = True
            delivered = await self._finish(send)
            client._busy = False
            if not delivered:
                return
            self.metrics.messages_sent.inc()
            self.metrics.delivery_lag.observe(max(0.0, self.clock() - frame.published_at))
            if client._pending is not None:
                client._wakeup.set()  # a newer frame arrived while this one was being sent

    async def _finish(self, send: Awaitable[None]) -> bool:
        """Await a send under the send timeout; False (counted) if it failed."""
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await send
        except TimeoutError:
            self.metrics.send_failures.inc()
            log.warning("client dropped: a send stalled for more than %ss", self.send_timeout_s)
            return False
        except OSError:  # the peer went away mid-send (uvicorn's ClientDisconnected)
            self.metrics.send_failures.inc()
            return False
        return True

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


@types.coroutine
def _resume(send: Coroutine[Any, Any, None], waiting_on: object) -> Generator[Any, Any, None]:
    """Continue a send that suspended on its first step, as if it had been awaited.

    `waiting_on` is what the send yielded to the event loop (the future it waits for);
    yielding it again makes the awaiting task wait for the same thing, then the send is
    driven to its end. If the wait is cancelled (the send timeout), the send is closed.
    """
    try:
        yield waiting_on
    except BaseException:
        send.close()
        raise
    yield from send.__await__()


def _abandon(send: Awaitable[None]) -> None:
    """Close a handed-over send that will never be awaited (its client is closing)."""
    if isinstance(send, Generator):
        send.close()
