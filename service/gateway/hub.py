"""The hub: connected clients and the fan-out of frames to them.

This is the seed's `SocketBroadcaster`. Broadcasting is synchronous and O(clients) and
never waits for a socket, so one slow or dead client cannot delay the others:

- A client that is idle (nothing in flight) gets the frame written at once: the frame's
  bytes are built once per message (per wire form: plain or compressed WebSocket frame,
  Server-Sent Event) and written straight to its socket when the server offers that
  (`Sink.write_now`); otherwise the ASGI send is started inside the loop and,
  as long as the socket's buffer has room, completes without suspending. No task switch
  per client per frame, which is what makes the naive `for ws in clients: await
  ws.send(...)` loop fast, without its failure mode.
- If that send would block (the peer is not reading), it is handed, unfinished, to a
  writer task made for that client, which finishes it under the send timeout, then
  sends whatever arrived meanwhile, and ends when the client is idle again. Most
  clients never need one: a connection costs one task, its handler.
- A client that is busy gets the frame in its one-slot mailbox ("latest wins"); a frame
  replaced there before it was sent is counted as conflated.
- A client whose send stalls past the timeout is dropped, alone: its connection is
  aborted (`Sink.abort`), which its handler sees as the peer leaving, and ends.
- Whatever one client's socket raises (a peer gone, or anything unexpected) drops that
  client alone: the fan-out goes on to the others and never fails the relay.

Needs nothing but the standard library and our metrics: sockets come in through `Sink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Generator

from gateway import sendstep
from gateway.client import Client, Sink
from gateway.metrics import Metrics, observe_many
from gateway.payload import Frame

log = logging.getLogger(__name__)

WS_1001_GOING_AWAY = 1001
CLOSE_TICK_S = 0.05  # shutdown closes clients in batches, one batch per tick


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
    def client_count(self) -> int:
        return len(self.active_connections)

    @property
    def latest_payload(self) -> str | None:
        """The seed's `_latest_payload`: the newest relayed payload, as sent."""
        return self.latest.text if self.latest else None

    def connect(self, sink: Sink) -> Client:
        """Register an accepted socket; send it the cached frame.

        If the hub drops the client (now, or later), it aborts the connection: the
        handler sees the peer leave and returns (`Client.reason` says why).
        """
        client = Client(sink)
        self.active_connections.add(client)
        self._empty.clear()
        self.metrics.connections_total.inc()
        self.metrics.connections_active.set(len(self.active_connections))
        if self.latest is not None:
            self._deliver(client, self.latest)
        return client

    def disconnect(self, client: Client) -> None:
        """Forget a client and stop its writer. Idempotent."""
        client.closed = True
        if client.writer is not None:
            client.writer.cancel()
        self.active_connections.discard(client)
        self.metrics.connections_active.set(len(self.active_connections))
        if not self.active_connections:
            self._empty.set()

    def broadcast(self, frame: Frame) -> int:
        """Cache `frame` and deliver it to every client; return how many frames it replaced.

        Never waits for a socket: idle clients are written to directly, busy ones get the
        frame in their mailbox (see the module docstring).
        """
        started = time.perf_counter()
        self.latest = frame
        conflated = sent = 0
        for client in self.active_connections:
            if client.closed:
                continue
            if client.writer is not None:  # busy: latest wins
                conflated += client.pending is not None
                client.pending = frame
                continue
            if self._write_or_send(client, frame):
                sent += 1
        metrics = self.metrics
        if sent:
            metrics.messages_sent.inc(sent)
            observe_many(metrics.delivery_lag, max(0.0, self.clock() - frame.published_at), sent)
        if conflated:
            metrics.messages_conflated.inc(conflated)
        metrics.broadcast_duration.observe(time.perf_counter() - started)
        return conflated

    def _deliver(self, client: Client, frame: Frame) -> None:
        """Send one frame to an idle client now, counting it if it went out at once."""
        if self._write_or_send(client, frame):
            self.metrics.messages_sent.inc()
            self.metrics.delivery_lag.observe(max(0.0, self.clock() - frame.published_at))

    def _write_or_send(self, client: Client, frame: Frame) -> bool:
        """Write the frame directly, or start the ASGI send; True if it went out at once.

        The one error boundary per client inside the fan-out: anything its socket raises
        drops that client, counted, and the loop goes on with the next one.
        """
        try:
            return client.sink.write_now(frame) or self._send_now(client, frame)
        except Exception as exc:
            self._drop(client, self._failed(exc))
        return False

    def _send_now(self, client: Client, frame: Frame) -> bool:
        """Start the ASGI send of `frame`; True if it completed at once.

        One step of the coroutine (see sendstep.py): with room in the socket's buffer the
        whole send runs synchronously and ends here. If it would block, a writer task
        finishes it.
        """
        send = client.sink.send(frame)
        waiting_on = sendstep.start(send)
        if waiting_on is sendstep.DONE:
            return True
        client.writer = asyncio.create_task(
            self._write(client, frame, sendstep.resume(send, waiting_on)), name="gateway-writer"
        )
        return False

    async def _write(self, client: Client, frame: Frame, send: Awaitable[None]) -> None:
        """A client's writer: finish `send`, then the newest frame that came meanwhile."""
        try:
            while True:
                failure = await self._finish(send)
                if failure is not None:
                    self._drop(client, failure)
                    return
                self.metrics.messages_sent.inc()
                self.metrics.delivery_lag.observe(max(0.0, self.clock() - frame.published_at))
                if client.pending is None or client.closed:
                    return
                frame, client.pending = client.pending, None
                send = client.sink.send(frame)
        finally:
            client.writer = None
            if isinstance(send, Generator):  # a handed-over send that was cancelled
                send.close()

    async def _finish(self, send: Awaitable[None]) -> str | None:
        """Await a send under the send timeout; the close reason (counted) if it failed."""
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await send
        except Exception as exc:  # this client's fault alone, whatever it is
            return self._failed(exc)
        return None

    def _failed(self, exc: Exception) -> str:
        """Count a failed send; the close reason it stands for (metrics.CLOSE_REASONS)."""
        self.metrics.send_failures.inc()
        if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
            log.warning("client dropped: a send stalled for more than %ss", self.send_timeout_s)
            return "send_timeout"
        if isinstance(exc, (OSError, RuntimeError)):  # the peer went away (ClientDisconnected)
            return "client"
        log.warning("client dropped: its send failed (%s: %s)", type(exc).__name__, exc)
        return "error"

    def _drop(self, client: Client, reason: str) -> None:
        """Give up on a client: no more frames, and its connection is aborted now."""
        if client.dropped:
            return
        client.closed = client.dropped = True
        client.reason = client.reason or reason
        try:
            client.sink.abort()
        except Exception as exc:  # already gone: nothing left to release
            log.debug("abort of a dropped client failed: %s: %s", type(exc).__name__, exc)

    async def _say_goodbye(self, client: Client, code: int) -> None:
        client.closed = True
        client.reason = client.reason or "shutdown"
        if client.writer is not None:
            client.writer.cancel()  # a close frame goes out instead of the pending frames
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await client.sink.close(code)
        except (TimeoutError, OSError):
            self._drop(client, "shutdown")  # it stalled or left: end it from our side

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
        goodbyes: set[asyncio.Task[None]] = set()
        try:
            for start in range(0, len(clients), size):
                if start:
                    await asyncio.sleep(spread_s / batches)
                for client in clients[start : start + size]:
                    goodbyes.add(asyncio.create_task(self._say_goodbye(client, code)))
            async with asyncio.timeout(self.send_timeout_s + 1.0):
                await asyncio.gather(*goodbyes)
                await self._empty.wait()
        except TimeoutError:
            log.warning("%d clients still open after shutdown", len(self.active_connections))
        finally:
            for task in goodbyes:
                task.cancel()
            await asyncio.gather(*goodbyes, return_exceptions=True)
