"""The soak's load: steady and churning WebSocket clients, stalled sockets, the publisher.

Steady clients stay connected and must see `seq` strictly increasing; churners connect,
read for a random lifetime and leave; a stalled client never reads (the gateway must drop
it). Every healthy client connected at the end must get the final message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from dataclasses import dataclass, field

import msgspec
import nats
import nats.errors
import websockets
from nats.js import JetStreamContext
from websockets.exceptions import ConnectionClosed

from benchkit.pubchild import SUBJECT
from benchkit.rawws import open_stalled

FINAL_TIMEOUT_S = 15.0  # every healthy client gets the final message within this


@dataclass
class Stats:
    """What the clients saw, across the whole run."""

    connects: int = 0
    frames: int = 0
    first_frame_s: list[float] = field(default_factory=list)
    """Connect to first frame, for churn clients that connected once data existed."""
    no_frame: int = 0
    """Churn clients alive for a second or more that never got a frame."""
    unexpected_closes: list[str] = field(default_factory=list)
    order_violations: int = 0
    final_expected: int = 0
    final_received: int = 0


@dataclass
class Run:
    port: int
    stats: Stats
    stop_churn: asyncio.Event
    final_seq: int | None = None
    final_published: asyncio.Event = field(default_factory=asyncio.Event)
    data_exists: bool = False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/stream"


def _seq(raw: str | bytes) -> int:
    doc = json.loads(raw)
    return int(doc["seq"])


async def _await_final(run: Run, ws: websockets.ClientConnection, last_seq: int) -> None:
    """Read until the final message (counted), or fail after FINAL_TIMEOUT_S."""
    run.stats.final_expected += 1
    try:
        async with asyncio.timeout(FINAL_TIMEOUT_S):
            await run.final_published.wait()
            while last_seq < (run.final_seq or 0):
                seq = _seq(await ws.recv())
                run.stats.frames += 1
                if seq <= last_seq:
                    run.stats.order_violations += 1
                last_seq = seq
    except (TimeoutError, ConnectionClosed) as exc:
        run.stats.unexpected_closes.append(f"final not received: {type(exc).__name__}")
        return
    run.stats.final_received += 1


async def steady_client(run: Run) -> None:
    """Connected for the whole run: never dropped, sequence strictly increasing."""
    stats = run.stats
    async with websockets.connect(run.url, open_timeout=10) as ws:
        stats.connects += 1
        last = 0
        try:
            while not run.stop_churn.is_set():
                try:
                    async with asyncio.timeout(0.5):  # to look at the stop flag
                        seq = _seq(await ws.recv())
                except TimeoutError:
                    continue
                stats.frames += 1
                if seq <= last:
                    stats.order_violations += 1
                last = seq
        except ConnectionClosed as exc:
            stats.unexpected_closes.append(f"steady client closed: {exc}")
            return
        await _await_final(run, ws, last)


async def churn_client(run: Run, rng: random.Random) -> None:
    """Connect, read for a random lifetime, close; again, until churn stops."""
    stats = run.stats
    while not run.stop_churn.is_set():
        lifetime = rng.uniform(0.2, 3.0)
        had_data = run.data_exists
        started = time.monotonic()
        got = 0
        last = 0
        try:
            async with websockets.connect(run.url, open_timeout=10) as ws:
                stats.connects += 1
                connected_at = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(lifetime):
                        async for raw in ws:
                            if got == 0 and had_data:
                                stats.first_frame_s.append(time.monotonic() - connected_at)
                            got += 1
                            stats.frames += 1
                            seq = _seq(raw)
                            if seq <= last:
                                stats.order_violations += 1
                            last = seq
                if ws.close_code is not None:  # the gateway closed a healthy client
                    stats.unexpected_closes.append(f"churn client closed: {ws.close_code}")
                    continue
                if run.stop_churn.is_set():
                    await _await_final(run, ws, last)
        except ConnectionClosed as exc:
            stats.unexpected_closes.append(f"churn client closed: {exc}")
        except OSError as exc:
            stats.unexpected_closes.append(f"churn client could not connect: {exc}")
        if had_data and got == 0 and time.monotonic() - started >= 1.0:
            stats.no_frame += 1


async def stalled_clients(run: Run, every_s: float, sockets: list[socket.socket]) -> None:
    """A new stalled client every `every_s` seconds until churn stops; the gateway must drop
    each one itself (it never answers a ping)."""
    while not run.stop_churn.is_set():
        sockets.append(open_stalled(run.url))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.stop_churn.wait(), every_s)


@dataclass
class Published:
    ok: int = 0
    failed: int = 0
    seq: int = 0


async def publisher(
    js: JetStreamContext, rate_hz: float, pad: str, out: Published, stop: asyncio.Event
) -> None:
    """Publish at `rate_hz` until `stop` is set; failures (NATS down) are counted, not fatal.

    A flag, not cancellation: on Python 3.11 a cancel that lands as nats-py's `wait_for`
    completes is lost (CPython gh-86296), and the soak then waited for this loop forever.
    """
    interval, next_at = 1.0 / rate_hz, time.monotonic()
    while not stop.is_set():
        out.seq += 1
        data = msgspec.json.encode({"seq": out.seq, "ts": time.time(), "pad": pad})
        try:
            await js.publish(SUBJECT, data, timeout=1.0)
            out.ok += 1
        except (TimeoutError, nats.errors.Error):
            out.failed += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def publish_final(js: JetStreamContext, out: Published) -> int:
    deadline = time.monotonic() + FINAL_TIMEOUT_S
    while True:
        out.seq += 1
        data = msgspec.json.encode({"seq": out.seq, "ts": time.time(), "final": True})
        try:
            await js.publish(SUBJECT, data, timeout=1.0)
            out.ok += 1
            return out.seq
        except (TimeoutError, nats.errors.Error):
            out.failed += 1
            if time.monotonic() > deadline:
                raise
