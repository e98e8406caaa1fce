"""The fault table, against real processes: what breaks, and that the gateway carries on.

NATS losing its data, the stream or the consumer deleted under the gateway, the gateway
itself SIGKILLed or SIGTERMed under load, and hostile clients: inbound floods, slow
readers, half-open sockets (send timeout, pings), connections that never finish their
handshake (slowloris), and dropped clients that would keep their socket. The NATS restart
with its data kept and NATS absent at start are in test_relay.py; the stalled client and
oversized inbound frames in test_relay.py and test_handshake.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import nats.errors
import nats.js.errors
import pytest
import websockets
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from websockets.exceptions import ConnectionClosed

from gateway.natsserver import NatsServer

from conftest import (
    GatewayProcess,
    jetstream,
    make_settings,
    publish_json,
    recv_json,
    running_gateway,
    sample,
    seconds,
    stalled_client,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio

STREAM, DURABLE = "LEVEL_SIGNALS", "gateway_levels"
REBIND_WARNING = "rebinding"
MAX_REBINDS = 10  # a crash loop would log one per second, forever


def rebinds(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        REBIND_WARNING in record.getMessage()
        for record in caplog.records
        if record.name == "gateway.relay" and record.levelno == logging.WARNING
    )


async def consumer_exists(js: JetStreamContext, durable: str = DURABLE) -> bool:
    try:
        await js.consumer_info(STREAM, durable)
    except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
        return False
    return True


async def relay_keeps_flowing(
    js: JetStreamContext, ws: websockets.ClientConnection, tag: str, n: int = 30
) -> None:
    """Publish `n` messages at 10 Hz (~3 s, two consumer-info rounds); each arrives in order."""
    for i in range(n):
        await publish_json(js, {tag: i})
        assert await recv_json(ws) == {tag: i}
        await asyncio.sleep(0.1)  # the publish rate: an observation window, not a synchronisation


# --- NATS and JetStream faults ---------------------------------------------------------


async def test_nats_restarted_with_data_lost_recreates_stream_and_consumer(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """NATS back on the same port with an empty store: stream and consumer recreated, relay on."""
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    async with running_gateway(make_settings(nats_server.url), registry) as gw:
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            async with jetstream(nats_server.url) as js:
                for n in range(5):
                    await publish_json(js, {"before": n})
                    assert await recv_json(ws) == {"before": n}
            port = nats_server.port
            nats_server.stop(signal.SIGKILL)
            shutil.rmtree(nats_server.store_dir)
            nats_server.store_dir.mkdir()
            await wait_until(lambda: not gw.relay.nats_connected, what="the gateway to notice")
            restarted = NatsServer(nats_server.store_dir, port=port).start()
            try:
                async with jetstream(restarted.url) as js:
                    await wait_until(lambda: consumer_exists(js), timeout=20, what="the consumer")
                    await wait_until(lambda: gw.relay.ready, what="the relay to rebind")
                    info = await js.stream_info(STREAM)
                    assert info.config.max_msgs_per_subject == 100, "the gateway's own stream"
                    # The new stream numbers from 1 again: the old sequence floor must not
                    # hide its messages.
                    await relay_keeps_flowing(js, ws, "after")
            finally:
                restarted.stop()
        assert len(gw.hub.active_connections) == 0
    assert sample(registry, "gateway_connections_total") == 1, "the client never reconnected"
    assert rebinds(caplog) < MAX_REBINDS, caplog.text


async def test_stream_deleted_while_running_is_recreated_without_a_crash_loop(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream deleted under a running gateway: recreated, relaying resumes, few rebinds."""
    caplog.set_level(logging.INFO)
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            for n in range(5):
                await publish_json(js, {"before": n})
                assert await recv_json(ws) == {"before": n}
            await js.delete_stream(STREAM)
            await wait_until(lambda: consumer_exists(js), timeout=15, what="the new consumer")
            await wait_until(lambda: gw.relay.ready, what="the relay to rebind")
            await relay_keeps_flowing(js, ws, "after")
    assert "created stream LEVEL_SIGNALS" in caplog.text
    assert 1 <= rebinds(caplog) < MAX_REBINDS, caplog.text


async def test_consumer_deleted_while_running_is_recreated(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The durable deleted under a running gateway: recreated; the newest message still arrives."""
    caplog.set_level(logging.INFO)
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw)) as ws:
            for n in range(5):
                await publish_json(js, {"before": n})
                assert await recv_json(ws) == {"before": n}
            await js.delete_consumer(STREAM, DURABLE)
            # Published while no consumer exists: the recreated one starts at the newest.
            await publish_json(js, {"orphan": 1})
            assert await recv_json(ws, timeout=15) == {"orphan": 1}
            assert await consumer_exists(js)
            await relay_keeps_flowing(js, ws, "after")
    assert 1 <= rebinds(caplog) < MAX_REBINDS, caplog.text


# --- the gateway process killed or stopped ---------------------------------------------


def gateway_env(nats_url: str, **extra: str) -> dict[str, str]:
    return {"NATS_URL": nats_url, "GATEWAY_LIVE_VIEW": "0", **extra}


async def wait_ready(port: int, timeout: float = 15.0) -> None:
    async with httpx.AsyncClient(timeout=2.0) as http:

        async def ready() -> bool:
            try:
                return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(ready, timeout=timeout, what="/ready to answer 200")


async def scrape(port: int, name: str) -> float:
    """One sample (no labels) from the gateway's /metrics."""
    async with httpx.AsyncClient(timeout=2.0) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_gateway_sigkilled_and_restarted_resumes_its_durable_primed(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """After a SIGKILL the restarted gateway resumes its durable, primed, with no stale burst."""
    # A stable identity, as an orchestrator keeps for a container restarted in place (the
    # test's port 0 differs at every start): the new process takes its old lease over.
    env = {**gateway_env(nats_server.url), "GATEWAY_REPLICA_ID": "gateway-0"}
    first = gateway_process(env)
    port = first.wait_started()
    await wait_ready(port)
    async with jetstream(nats_server.url) as js:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:
            for n in range(5):
                await publish_json(js, {"n": n})
                assert await recv_json(ws) == {"n": n}
            created = (await js.consumer_info(STREAM, DURABLE)).created
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait_exit)
            with pytest.raises(ConnectionClosed) as closed:
                await recv_json(ws)
            assert closed.value.rcvd is None, "a killed gateway sends no close frame"
        # While it is down, a backlog builds up on its durable.
        for n in range(5, 55):
            await publish_json(js, {"n": n})

        second = gateway_process(env)
        port = second.wait_started()
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as early:
            await wait_ready(port)
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as late:
                assert await recv_json(late, timeout=2) == {"n": 54}, "primed with the newest"
                assert await recv_json(early) == {"n": 54}, "no stale frame before the newest"

                async def drained() -> bool:
                    info = await js.consumer_info(STREAM, DURABLE)
                    return info.num_pending == 0 and info.num_ack_pending == 0

                await wait_until(drained, what="the backlog to be drained and acked")
                await publish_json(js, {"n": 55})
                for ws in (early, late):
                    assert await recv_json(ws) == {"n": 55}, "no stale frame in between"
                info = await js.consumer_info(STREAM, DURABLE)
                assert info.created == created, "the same durable consumer, resumed"
                assert await scrape(port, "gateway_messages_received_total") >= 51
                # 54 and 55 to each of the two clients: the backlog was never relayed.
                assert await scrape(port, "gateway_messages_sent_total") == 4


@contextlib.contextmanager
def publisher_process(nats_url: str, rate_hz: float, size: int) -> Iterator[subprocess.Popen[str]]:
    """`gateway publish` as a child process; stopped (by its PID) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "publish", "--rate", str(rate_hz), "--size", str(size)],
        env={**os.environ, "NATS_URL": nats_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(seconds(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Reader:
    """A client that reads every frame until the server closes; remembers the close code."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames = 0
        self.code: int | None = None
        self.closed_at: float | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for _ in self.ws:
                self.frames += 1
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        self.code = rcvd.code if rcvd is not None else None
        self.closed_at = time.monotonic()


async def test_sigterm_during_heavy_fanout_closes_everyone_1001_and_exits_0(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """SIGTERM with 200 clients at 50 Hz x 4 KB: every client gets 1001, exit 0 in seconds."""
    clients = 200
    proc = gateway_process(gateway_env(nats_server.url))  # default drain window: 2 s
    port = proc.wait_started()
    await wait_ready(port)
    readers = [
        Reader(await websockets.connect(f"ws://127.0.0.1:{port}/ws/stream", max_size=None))
        for _ in range(clients)
    ]
    try:
        with publisher_process(nats_server.url, rate_hz=50, size=4096):
            await wait_until(
                lambda: all(r.frames >= 25 for r in readers), timeout=30, what="the fan-out"
            )
            started = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*(r.task for r in readers)), seconds(15))
            try:
                code = await asyncio.to_thread(proc.wait_exit, 15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"no exit 15 s after SIGTERM:\n{proc.output[-3000:]}")
            exited = time.monotonic() - started
    finally:
        for r in readers:
            r.task.cancel()
        await asyncio.gather(*(r.ws.close() for r in readers))
    codes = [r.code for r in readers]
    assert codes.count(1001) == clients, f"close codes: {sorted(set(map(str, codes)))}"
    assert code == 0, proc.output
    assert exited < seconds(6), f"exited {exited:.1f}s after SIGTERM"


# --- hostile clients -------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455, section 5.2) with a payload under 64 KiB."""
    mask, size = os.urandom(4), len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode]) + length + mask + masked


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One (unmasked) server frame from a blocking socket: its opcode and payload."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the gateway closed the connection"
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size >= 126:
        size = int.from_bytes(exactly(2 if size == 126 else 8), "big")
    return first & 0x0F, exactly(size)


def read_until(sock: socket.socket, opcode: int, payload: bytes) -> None:
    """Read frames until one with `opcode` and `payload` arrives (others are skipped)."""
    while read_frame(sock) != (opcode, payload):
        pass


OP_TEXT, OP_PING, OP_PONG = 0x1, 0x9, 0xA


async def test_flood_of_small_inbound_frames_is_ignored_without_growing_memory(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """50k small inbound frames: memory stays flat, the flooder stays, others keep latency."""
    frames, batch = 50_000, 1_000
    burst = client_frame(OP_TEXT, b"x" * 512) * batch  # 25 MB in all: buffering it would show
    proc = gateway_process(gateway_env(nats_server.url))
    port = proc.wait_started()
    await wait_ready(port)

    def flood(sock: socket.socket, count: int) -> None:
        """Send `count` frames, then a ping; return once its pong proves they were all read."""
        for _ in range(count // batch):
            sock.sendall(burst)
        sock.sendall(client_frame(OP_PING, b"sync"))
        read_until(sock, OP_PONG, b"sync")

    # The flooder is a raw socket driven from a thread, so the flood does not slow down
    # this event loop, which measures the bystander's latency.
    flooder = raw_websocket(port)
    try:
        async with (
            jetstream(nats_server.url) as js,
            websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as bystander,
        ):
            await asyncio.to_thread(flood, flooder, 5 * batch)  # warm-up: allocator at size
            before = rss_bytes(proc.proc.pid)
            flooding = asyncio.ensure_future(asyncio.to_thread(flood, flooder, frames))
            latencies: list[float] = []
            n = 0
            while not flooding.done() or n < 10:
                sent_at = time.monotonic()
                await publish_json(js, {"n": n})
                assert await recv_json(bystander) == {"n": n}
                latencies.append(time.monotonic() - sent_at)
                n += 1
                await asyncio.sleep(0.02)  # the publish rate while the flood runs
            await flooding
            after = rss_bytes(proc.proc.pid)

            await publish_json(js, {"final": True})
            assert await recv_json(bystander) == {"final": True}
            # The flooder was never disconnected: it still gets frames.
            await asyncio.to_thread(read_until, flooder, OP_TEXT, b'{"final":true}')
            assert await scrape(port, "gateway_connections_active") == 2
    finally:
        flooder.close()
    growth = after - before
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB ({before} -> {after})"
    assert max(latencies) < seconds(0.5), f"bystander latency up to {max(latencies):.3f}s"


async def test_slow_reader_gets_newest_frames_only_and_stays_connected(
    nats_server: NatsServer,
) -> None:
    """A reader ten times slower than the publisher skips to newer frames; a fast one gets all."""
    count, pad = 80, "x" * 400_000  # big frames: the kernel's socket buffers fill within a few
    registry = CollectorRegistry()
    async with (
        running_gateway(make_settings(nats_server.url), registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.connect(("127.0.0.1", gw.port))
        # max_queue=1: the client library buffers one frame, not megabytes, so the slowness
        # reaches the gateway. No client keepalive: its pongs would wait behind the backlog.
        # No compression: 400 KB of padding would deflate to nothing and never back up.
        async with (
            websockets.connect(
                ws_url(gw),
                sock=sock,
                max_queue=1,
                max_size=None,
                ping_interval=None,
                compression=None,
            ) as slow,
            websockets.connect(ws_url(gw), max_size=None, compression=None) as fast,
        ):
            await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")

            async def publish() -> None:
                for n in range(count):
                    await publish_json(js, {"n": n, "pad": pad})
                    await asyncio.sleep(1 / 40)  # the publish rate: 40 Hz

            async def read(ws: websockets.ClientConnection, period: float) -> list[int]:
                seen: list[int] = []
                while not seen or seen[-1] != count - 1:
                    n = (await recv_json(ws, timeout=15))["n"]
                    assert isinstance(n, int)
                    seen.append(n)
                    if period:
                        await asyncio.sleep(period)  # the client's pace: 4 frames a second
                return seen

            _, fast_seen, slow_seen = await asyncio.gather(
                publish(), read(fast, 0.0), read(slow, 0.25)
            )
            await publish_json(js, {"n": count})
            for ws in (fast, slow):
                assert (await recv_json(ws))["n"] == count, "both still connected"
    assert fast_seen == list(range(count)), "the fast client got every frame"
    assert slow_seen == sorted(set(slow_seen)), "in order, no repeats"
    assert len(slow_seen) < count, "the slow client skipped frames"
    assert sample(registry, "gateway_messages_conflated_total") > 0
    assert sample(registry, "gateway_send_failures_total") == 0, "not counted as failed"


async def test_half_open_client_is_dropped_by_send_timeout_while_others_keep_latency(
    nats_server: NatsServer,
) -> None:
    """A client that stops reading is dropped after the send timeout; others' latency holds."""
    registry = CollectorRegistry()
    settings = make_settings(nats_server.url, send_timeout_s=1.0)
    pad = "x" * 100_000
    async with (
        running_gateway(settings, registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        half_open = stalled_client(gw.port)
        try:
            async with websockets.connect(ws_url(gw), max_size=None) as healthy:
                await wait_until(lambda: len(gw.hub.active_connections) == 2, what="two clients")
                latencies: list[float] = []
                n = 0
                while len(gw.hub.active_connections) == 2 or n < 10:
                    assert n < 500, "the half-open client was never dropped"
                    sent_at = time.monotonic()
                    await publish_json(js, {"n": n, "pad": pad})
                    assert (await recv_json(healthy))["n"] == n
                    latencies.append(time.monotonic() - sent_at)
                    n += 1
                    await asyncio.sleep(0.02)  # the publish rate: 50 Hz
        finally:
            half_open.close()
    assert sample(registry, "gateway_send_failures_total") == 1
    assert max(latencies) < seconds(0.5), f"healthy latency up to {max(latencies):.3f}s"


def raw_websocket(port: int) -> socket.socket:
    """A raw socket past the WebSocket handshake, which from now on never reads nor answers."""
    sock = stalled_client(port)
    sock.settimeout(seconds(5))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def test_silent_half_open_client_is_found_by_ping_timeout(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """A client that never answers pings is dropped after the ping timeout, with no traffic."""
    env = gateway_env(nats_server.url, GATEWAY_PING_INTERVAL_S="0.5")
    proc = gateway_process(env)
    port = proc.wait_started()
    await wait_ready(port)
    # Nothing is published: without pings no send would ever fail on this socket.
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") as healthy:
        silent = raw_websocket(port)
        try:
            await wait_until(lambda: _active_is(port, 2), what="both clients to be counted")
            await wait_until(
                lambda: _active_is(port, 1), timeout=8, what="the silent client to be dropped"
            )
        finally:
            silent.close()
        await healthy.ping()  # a client that answers pings stays


async def _active_is(port: int, n: int) -> bool:
    return await scrape(port, "gateway_connections_active") == n


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n", id="partial-head"),
    ],
)
async def test_connection_that_never_completes_its_handshake_is_closed(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], sent: bytes
) -> None:
    """A connection whose request head never completes is closed by the handshake timeout."""
    proc = gateway_process(gateway_env(nats_server.url, GATEWAY_HANDSHAKE_TIMEOUT_S="1"))
    port = proc.wait_started()

    def read_to_eof(sock: socket.socket) -> bytes:
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        sock.settimeout(seconds(6))
        try:
            received = await asyncio.to_thread(read_to_eof, sock)
        except TimeoutError:
            pytest.fail("the connection was still open 6 s after it began")
    assert b"101 Switching Protocols" not in received
    rejected = 'gateway_connections_rejected_total{reason="handshake_timeout"}'
    assert await scrape(port, rejected) == 1


HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"", id="first-request"),
        pytest.param(
            HEALTH_REQUEST,
            id="after-a-keep-alive-request",
        ),
    ],
)
async def test_slowloris_trickling_a_request_head_is_closed(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], first: bytes
) -> None:
    """A request head sent a byte at a time, never finished, is cut off by the timeout."""
    proc = gateway_process(gateway_env(nats_server.url, GATEWAY_HANDSHAKE_TIMEOUT_S="1"))
    port = proc.wait_started()
    head = b"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000

    def trickle(sock: socket.socket, limit: float) -> float | None:
        """Send `first`, then `head` a byte every 0.1 s; seconds until closed, or None."""
        sock.sendall(first)
        if first:
            response = sock.recv(4096)
            assert response.startswith(b"HTTP/1.1 200"), response
        started = time.monotonic()
        sock.settimeout(0.1)  # the trickle's pace; also how often EOF is checked
        for byte in head:
            if time.monotonic() - started > limit:
                return None
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(4096) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:  # reset by the gateway
                return time.monotonic() - started
        return None

    with socket.create_connection(("127.0.0.1", port)) as sock:
        closed_after = await asyncio.to_thread(trickle, sock, seconds(6))
    assert closed_after is not None, "still open 6 s into a 1-s handshake timeout"
    rejected = 'gateway_connections_rejected_total{reason="handshake_timeout"}'
    assert await scrape(port, rejected) == 1


def open_sockets(pid: int) -> int:
    """How many sockets a process holds, from /proc/PID/fd."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


async def test_client_dropped_for_stalling_releases_its_socket(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """A stalled client dropped by the send timeout loses its socket too, though it never reads."""
    proc = gateway_process(gateway_env(nats_server.url, GATEWAY_SEND_TIMEOUT_S="1"))
    port = proc.wait_started()
    await wait_ready(port)
    baseline = open_sockets(proc.proc.pid)
    stalled = [stalled_client(port) for _ in range(5)]  # alive, never reading: a zero window
    try:
        await wait_until(lambda: _active_is(port, 5), what="the stalled clients")
        async with jetstream(nats_server.url) as js:
            pad = "x" * 200_000
            n = 0
            while not await _active_is(port, 0):
                assert n < 500, "the stalled clients were never dropped"
                await publish_json(js, {"n": n, "pad": pad})
                n += 1
        assert await scrape(port, "gateway_send_failures_total") == 5
        # Dropped means gone: not a socket kept open behind the gauge's back, waiting forever
        # to flush megabytes to a peer that never reads.
        await wait_until(
            lambda: open_sockets(proc.proc.pid) <= baseline,
            timeout=10,
            what=f"the gateway's sockets to return to {baseline}",
        )
    finally:
        for sock in stalled:
            sock.close()


async def test_a_client_whose_socket_raises_anything_is_dropped_alone(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: one client's transport raises an unexpected error; the others keep
    every frame and the relay never takes it for a NATS failure."""
    registry = CollectorRegistry()
    async with (
        running_gateway(make_settings(nats_server.url), registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        clients = [await websockets.connect(ws_url(gw)) for _ in range(3)]
        try:
            await wait_until(lambda: len(gw.hub.active_connections) == 3, what="three clients")
            broken = next(iter(gw.hub.active_connections))

            def explode(frame: bytes) -> bool:
                raise ValueError("transport in a state nobody planned for")

            broken.sink._direct.write_frame = explode  # type: ignore[attr-defined]
            for n in range(10):
                await publish_json(js, {"n": n})
            await wait_until(lambda: broken.dropped, what="the broken client to be dropped")
            survivors = []
            for ws in clients:
                with contextlib.suppress(ConnectionClosed):
                    survivors.append([(await recv_json(ws))["n"] for _ in range(10)])
            assert survivors == [list(range(10))] * 2, "the two others got every frame"
            assert sample(registry, "gateway_send_failures_total") == 1
            assert sample(registry, "gateway_messages_received_total") == 10
            closed = {"reason": "error"}
            assert sample(registry, "gateway_connections_closed_total", closed) == 1
            assert gw.relay.ready
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))
    assert rebinds(caplog) == 0
