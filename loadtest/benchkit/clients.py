"""The bench's clients: N picows connections of one target, and what they received.

A relay client times every text frame (inflating compressed ones, RSV1); a NATS client
speaks the NATS text protocol over WebSocket. Every counted frame keeps its latency and
its message's `seq`, so late messages can be named.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any

from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_connect

from benchkit.rawws import DEFLATE_OFFER, DEFLATE_TAIL, NATS_HELLO, frame_header_len
from benchkit.targets import Target

HEAD = 128  # `ts` and `seq` are near the start of every payload


_TS_SEQ = re.compile(rb'"ts":\s*([0-9.eE+-]+),\s*"seq":\s*(\d+)')


QUIET_S = 0.5  # a target is drained when no frame arrived for this long...


QUIESCE_MAX_S = 6.0  # ...within this; else it is restarted before the next run


CONNECT_TIMEOUT_S = 20.0


@dataclass
class Window:
    """One measurement window: frames with lo < seq <= hi count.

    Every counted frame leaves its latency and its message's `seq` (parallel arrays), so
    a message that reached everyone late shows up by name, not only as a percentile.
    """

    lo: int
    hi: int
    delivered: int = 0
    lat: array[float] = field(default_factory=lambda: array("d"))
    seqs: array[int] = field(default_factory=lambda: array("l"))
    wire_bytes: int = 0  # WebSocket frame bytes (header + payload as sent) of counted frames
    deflated: int = 0  # counted frames that arrived compressed (RSV1)


class Pool:
    """N picows clients of one target, and what they received."""

    def __init__(
        self,
        target: Target,
        *,
        deflate: bool = False,
        full_inflate: bool = False,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.target = target
        self.full_inflate = full_inflate  # inflate whole compressed frames, not just the head
        self.inflate_errors = 0
        self.quiet_s = quiet_s
        self.deflate = deflate  # offer permessage-deflate (relay targets only)
        self.clients: list[tuple[Any, Any]] = []  # (WSTransport, listener)
        self.window: Window | None = None
        self.last_rx = 0.0
        self.failures = 0
        self.first_error = ""
        self.ttff: list[float] = []  # connect start -> first frame (or PONG), seconds

    def on_payload(
        self, listener: Any, head: bytes, now: float, wire: int = 0, deflated: bool = False
    ) -> None:
        self.last_rx = now
        w = self.window
        if w is None:
            return
        m = _TS_SEQ.search(head)
        if m is None:
            return
        seq = int(m[2])
        if w.lo < seq <= w.hi:
            w.delivered += 1
            listener.n += 1
            w.lat.append(now - float(m[1]))
            w.seqs.append(seq)
            w.wire_bytes += wire
            w.deflated += deflated

    async def open(self, n: int, batch: int) -> float:
        """Open `n` more clients, `batch` at a time; return the seconds it took."""
        urls = self.target.urls()
        t0 = time.perf_counter()
        start = len(self.clients) + self.failures
        for first in range(start, start + n, batch):
            idx = range(first, min(start + n, first + batch))
            await asyncio.gather(*(self._open_one(urls[i % len(urls)]) for i in idx))
        return time.perf_counter() - t0

    async def _open_one(self, url: str) -> None:
        listener_cls = NatsListener if self.target.protocol == "nats" else RelayListener
        headers = DEFLATE_OFFER if self.deflate and self.target.protocol == "relay" else None
        t0 = time.perf_counter()
        try:
            transport, listener = await ws_connect(
                lambda: listener_cls(self),
                url,
                websocket_handshake_timeout=CONNECT_TIMEOUT_S,
                max_frame_size=16 * 1024 * 1024,
                extra_headers=headers,
            )
            await asyncio.wait_for(listener.ready, CONNECT_TIMEOUT_S)
        except Exception as exc:
            self.failures += 1
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
            return
        self.ttff.append(listener.ready.result() - t0)
        self.clients.append((transport, listener))

    def live(self) -> int:
        return sum(1 for _, lst in self.clients if not lst.closed)

    def reset_counts(self) -> None:
        for _, lst in self.clients:
            lst.n = 0

    async def quiesce(self) -> bool:
        """Wait until no frame arrived for QUIET_S; False if still busy after QUIESCE_MAX_S."""
        deadline = time.monotonic() + QUIESCE_MAX_S
        while time.time() - self.last_rx < self.quiet_s:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        clients, self.clients = self.clients, []
        for transport, _ in clients:
            with contextlib.suppress(Exception):
                transport.send_close(WSCloseCode.GOING_AWAY)
                transport.disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(t.wait_disconnected() for t, _ in clients)), 10)
        self.failures = 0
        self.ttff = []


class _Listener(WSListener):  # type: ignore[misc]
    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.n = 0
        self.closed = False
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("disconnected before the first frame"))


_TEXT, _BINARY, _CONT, _CLOSE = (
    WSMsgType.TEXT,
    WSMsgType.BINARY,
    WSMsgType.CONTINUATION,
    WSMsgType.CLOSE,
)


class RelayListener(_Listener):
    """A client of the gateway or the naive relay: every text frame is one payload.

    A compressed frame (RSV1) is inflated up to the `ts` and `seq` it is timed by (2 µs
    for a 4 KB levels payload): all 2000 clients share this one process, and inflating
    all of it (8 µs, `--full-inflate`) would add ~16 ms per message to the last
    client's latency, a cost a browser pays on its own core. The full inflate also checks
    that every frame inflates to a whole JSON document (`inflate_errors`).
    """

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        mt = frame.msg_type
        if mt is _TEXT or mt is _BINARY:
            now = time.time()
            size = frame.payload_size
            if frame.rsv1:
                inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                data = frame.get_payload_as_bytes() + DEFLATE_TAIL
                if self.pool.full_inflate:
                    head = inflate.decompress(data)
                    if not head.endswith(b"}"):
                        self.pool.inflate_errors += 1
                else:
                    head = inflate.decompress(data, HEAD)
            else:
                head = bytes(frame.get_payload_as_memoryview()[:HEAD])
            if not self.ready.done():
                self.ready.set_result(time.perf_counter())
            self.pool.on_payload(self, head, now, size + frame_header_len(size), frame.rsv1)
        elif mt is _CLOSE:
            transport.disconnect()


class NatsListener(_Listener):
    """A client of nats-server's WebSocket listener, speaking the NATS text protocol.

    The byte stream is INFO, then MSG/PING/PONG lines; WebSocket frame boundaries need
    not match protocol boundaries, so it is parsed from a buffer. Ready = the PONG that
    answers the PING sent after SUB (the subscription is in place).
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.buf = bytearray()
        self.need = -1  # payload bytes still expected for the current MSG, -1 = a line

    def on_ws_connected(self, transport: Any) -> None:
        transport.send(_BINARY, NATS_HELLO)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        mt = frame.msg_type
        if mt is _CLOSE:
            transport.disconnect()
            return
        if mt is not _BINARY and mt is not _TEXT and mt is not _CONT:
            return
        now = time.time()
        buf = self.buf
        buf += frame.get_payload_as_bytes()
        pos, end = 0, len(buf)
        while True:
            need = self.need
            if need >= 0:
                if end - pos < need + 2:
                    break
                self.pool.on_payload(self, bytes(buf[pos : pos + min(need, HEAD)]), now)
                pos += need + 2
                self.need = -1
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"MSG ", pos):
                self.need = int(buf[buf.rfind(b" ", pos, eol) + 1 : eol])
            elif buf.startswith(b"PING", pos):
                transport.send(_BINARY, b"PONG\r\n")
            elif buf.startswith(b"PONG", pos):
                if not self.ready.done():
                    self.ready.set_result(time.perf_counter())
            elif buf.startswith(b"-ERR", pos):
                self.pool.first_error = self.pool.first_error or bytes(buf[pos:eol]).decode()
            pos = eol + 2
        if pos:
            del buf[:pos]
