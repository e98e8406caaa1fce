"""The fan-out benchmark: the gateway vs nats-server's own WebSocket listener vs the naive relay.

One invocation runs the same scenarios against three targets, one after another on the
same machine, so the interesting numbers are the ratios between them:

  gateway  `python -m gateway` (the product), an ephemeral JetStream consumer
  nats     nats-server's own WebSocket listener (`websocket { no_tls: true }`), clients
           speak the NATS text protocol over WebSocket: the Go reference
  naive    loadtest/naive_relay.py, the seed document's design (BASELINE, not the product)

A JetStream publisher (a child process) publishes `gateway.publisher.make_payload` payloads
(`ts` = publish epoch seconds, `seq`) to `levels.signals` at R Hz for D seconds. The
clients (picows on uvloop, in this process) time every frame against its `ts`. Per run:
delivered/expected frames, publish->receive latency p50/p90/p99/max, the server process's
CPU seconds per 1000 delivered frames (/proc/PID/stat utime+stime), its RSS
(/proc/PID/status VmRSS), the broker's (nats-server's) CPU, this client process's own CPU
(a saturated client is visible), and how much CPU *other* processes on the machine used
(/proc/stat busy minus ours; a noisy neighbour is visible too).

Scenarios (`--scenarios`, default all):
  idle      RSS per idle connection (fresh processes, N idle clients)
  storm     connect storm: N connections as fast as possible, each must get the cached
            payload (nats: no cache, so "served" = subscription confirmed by PONG)
  stall     M clients + K raw TCP clients that complete the handshake and never read
            (64 KB x 20 Hz), against a no-stall run on the same connections
  grid      clients x rates x size
  workers   the gateway alone at the grid's largest load: GATEWAY_WORKERS=1 vs 2 (two
            processes on one socket, each its own consumer): frames/s ratio

Everything is on loopback and bounded in time: a frame not received within GRACE_S of the
last publish counts as not delivered. Child processes are started here and stopped here,
by PID. Prints one table row per run, then one JSON line with everything (also saved in
--out, default loadtest/results/).

    uv run python loadtest/bench.py                              # everything, ~10 min
    uv run python loadtest/bench.py --scenarios grid --clients 100,1000 --rates 4
    uv run python loadtest/bench.py --quick                      # seconds, tiny N
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_connect

SELF = str(Path(__file__).resolve())
HERE = Path(SELF).parent
ROOT = HERE.parent
SUBJECT = "levels.signals"
STREAM = "LEVEL_SIGNALS"
TARGETS = ("gateway", "nats", "naive")
EXTRA_TARGETS = ("gateway-uvloop", "naive-uvloop")  # what-if variants, only when asked for
SCENARIOS = ("idle", "storm", "stall", "grid", "workers")
LABELS = {
    "gateway": "gateway (python -m gateway)",
    "nats": "nats-server WebSocket listener (Go reference)",
    "naive": "naive relay (seed design, BASELINE)",
    "gateway-uvloop": "gateway, unchanged code, run on uvloop (what-if)",
    "naive-uvloop": "naive relay on uvloop (what-if)",
}
GRACE_S = 3.0  # a frame later than this after the last publish is "not delivered"
QUIET_S = 0.5  # a target is drained when no frame arrived for this long...
QUIESCE_MAX_S = 6.0  # ...within this; else it is restarted before the next run
SETTLE_S = 0.3
CONNECT_TIMEOUT_S = 20.0
HEAD = 128  # `ts` and `seq` are near the start of every payload
_TS_SEQ = re.compile(rb'"ts":\s*([0-9.eE+-]+),\s*"seq":\s*(\d+)')
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def proc_cpu_s(pid: int, kernel_only: bool = False) -> float:
    """utime + stime of `pid` (all its threads), or stime alone, in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc_pid_stat(5)
    return (stime if kernel_only else utime + stime) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_info() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    cpuinfo, meminfo = read("/proc/cpuinfo").splitlines(), read("/proc/meminfo").splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "?")
    mem = next((int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal")), 0)
    versions: dict[str, str] = {}
    for dist in ("picows", "uvicorn", "websockets", "litestar", "nats-py", "uvloop", "msgspec"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    with contextlib.suppress(Exception):
        from gateway.natsserver import binary

        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=False)
        versions["nats-server"] = out.stdout.strip().rsplit(" ", 1)[-1]
    return {
        "gateway_source": source_identity(),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "mem_total_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "versions": versions,
    }


def source_identity() -> dict[str, Any]:
    """Which gateway code was measured: the commit, and whether service/ had local changes."""
    import hashlib

    def git(*args: str) -> str:
        exe = shutil.which("git")
        if exe is None:
            return ""
        out = subprocess.run(
            [exe, "--no-optional-locks", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((ROOT / "service" / "gateway").glob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "service_modified": git("status", "--porcelain", "--", "service").splitlines(),
        "service_sha256": digest.hexdigest()[:16],
    }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return hard


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        found.append(p := stack.pop())
        stack.extend(children.get(p, []))
    return found


def socket_count(pid: int) -> int:
    """Open sockets of `pid` (its connections, roughly), from /proc/PID/fd."""
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    with fds:
        return sum(1 for fd in fds if _is_socket(fd.path))


def _is_socket(path: str) -> bool:
    try:
        return os.readlink(path).startswith("socket:")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str, limit_s: float = 2.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit_s)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), limit_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --------------------------------------------------------------------------- processes


_CHILDREN: list[Any] = []  # every server process we started (has .stop()), for the safety net


@atexit.register
def _stop_leftovers() -> None:
    """Stop (by PID) any child still running when we exit, e.g. after Ctrl-C."""
    for child in _CHILDREN:
        with contextlib.suppress(OSError, RuntimeError):
            child.stop_now() if isinstance(child, Publisher) else child.stop()


class Child:
    """A child process we started; stopped by its PID only."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C in the terminal is ours to handle
            )
        _CHILDREN.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def wait_http(child: Child, port: int, path: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await http_get(port, path)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} not ready on {path} after {limit_s}s:\n{child.tail()}"
            )
        await asyncio.sleep(0.1)


class Publisher:
    """The JetStream publisher, a child process driven by JSON lines on its stdin."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        _CHILDREN.append(self)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SELF,
            "--publisher",
            self.nats_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
        )
        await self._reply(30.0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def run(self, base: int, count: int, rate: float, size: int) -> dict[str, Any]:
        """Publish seq base+1 .. base+count at `rate` Hz; return when done."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        cmd = {"base": base, "count": count, "rate": rate, "size": size}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._reply(count / rate + 30.0)

    async def _reply(self, limit_s: float) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        if not line:
            raise RuntimeError("the publisher exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop_now(self) -> None:
        """The exit safety net's stop: SIGTERM by PID."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def publisher_main(nats_url: str) -> None:
    """Child side of `Publisher`: one JSON command per stdin line, one JSON reply each."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the bench went away
        await _publish_commands(nats_url)


async def _publish_commands(nats_url: str) -> None:
    import nats

    from gateway.publisher import make_payload
    from gateway.relay import ensure_stream

    nc = await nats.connect(nats_url, name="bench-publisher", max_reconnect_attempts=3)
    js = nc.jetstream()
    await ensure_stream(js, STREAM, SUBJECT)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        base, count, interval = cmd["base"], cmd["count"], 1.0 / cmd["rate"]
        sent = failed = 0
        late_max = 0.0
        t0 = next_at = time.monotonic()
        for seq in range(base + 1, base + count + 1):
            late_max = max(late_max, time.monotonic() - next_at)
            try:
                await js.publish(SUBJECT, make_payload(seq, time.time(), cmd["size"]), timeout=5)
                sent += 1
            except Exception as exc:
                failed += 1
                print(f"publish {seq} failed: {exc!r}", file=sys.stderr)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        print(
            json.dumps(
                {
                    "sent": sent,
                    "failed": failed,
                    "seconds": time.monotonic() - t0,
                    "late_max_ms": late_max * 1000,
                }
            ),
            flush=True,
        )
    with contextlib.suppress(Exception):  # stdin closed: the bench is done (or gone)
        await asyncio.wait_for(nc.drain(), 3)


# --------------------------------------------------------------------------- targets


class Target:
    name = ""
    protocol = "relay"  # "relay": frames are the payloads; "nats": NATS protocol over WS

    def urls(self) -> list[str]:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def connections(self) -> int | None:
        """Connected clients as the server counts them (relays' /health), None if unknown."""
        return None

    def cpu_s(self, kernel_only: bool = False) -> float:
        return sum(proc_cpu_s(pid, kernel_only) for pid in self.pids())

    def rss_kib(self) -> int:
        return sum(proc_rss_kib(pid) for pid in self.pids())


class NatsTarget(Target):
    name = "nats"
    protocol = "nats"

    def __init__(self, server: Any, ws_port: int) -> None:
        self.server = server
        self.ws_port = ws_port

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.ws_port}/"]

    def pids(self) -> list[int]:
        return [self.server.pid]


class RelayTarget(Target):
    """A Python relay run as a child process on loopback."""

    health_path = "/health"
    ready_path = "/health"

    def __init__(self, nats_url: str, logdir: Path) -> None:
        self.nats_url = nats_url
        self.logdir = logdir
        self.child: Child | None = None
        self.port = 0
        self._pids: list[int] = []

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self, port: int) -> dict[str, str]:
        raise NotImplementedError

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.port}/ws/stream"]

    def pids(self) -> list[int]:
        return self._pids

    async def start(self) -> None:
        self.port = free_port()
        self.child = Child(self.name, self.argv(), self.env(self.port), self.logdir)
        await wait_http(self.child, self.port, self.ready_path)
        self._pids = descendants(self.child.pid)  # itself, and its workers if it has any

    async def stop(self) -> None:
        child, self.child, self._pids = self.child, None, []
        if child is not None:
            await asyncio.to_thread(child.stop)

    async def connections(self) -> int | None:
        try:
            _, body = await http_get(self.port, self.health_path)
            return int(json.loads(body)["connections"])
        except (OSError, TimeoutError, ValueError, KeyError):
            return None


class GatewayTarget(RelayTarget):
    name = "gateway"
    ready_path = "/ready"  # connected to NATS and subscribed
    uvloop = False
    workers = 1  # GATEWAY_WORKERS

    def argv(self) -> list[str]:
        if self.uvloop:  # the same `gateway` command, with uvloop as asyncio's loop
            code = "import sys, uvloop; uvloop.install(); from gateway.cli import main; "
            return [sys.executable, "-c", code + "sys.exit(main())"]
        return [sys.executable, "-m", "gateway"]

    def env(self, port: int) -> dict[str, str]:
        return {
            "NATS_URL": self.nats_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_MAX_CONNECTIONS": "1000000",
            "GATEWAY_DURABLE": "",  # ephemeral: every process (replica) its own consumer
            "GATEWAY_DRAIN_S": "0",
            "GATEWAY_WORKERS": str(self.workers),
        }


class NaiveTarget(RelayTarget):
    name = "naive"
    loop = "asyncio"  # the gateway's loop

    def argv(self) -> list[str]:
        return [sys.executable, str(HERE / "naive_relay.py")]

    def env(self, port: int) -> dict[str, str]:
        env = {"NATS_URL": self.nats_url, "HOST": "127.0.0.1", "PORT": str(port)}
        return {**env, "NAIVE_LOOP": self.loop}


class AltGatewayTarget(GatewayTarget):
    """The `gateway` package found in another directory (a variant of the hub, say)."""

    def __init__(self, name: str, pkg_parent: Path, nats_url: str, logdir: Path) -> None:
        super().__init__(nats_url, logdir)
        self.name = name
        self.pkg_parent = pkg_parent

    def env(self, port: int) -> dict[str, str]:
        return {**super().env(port), "PYTHONPATH": str(self.pkg_parent)}


class GatewayUvloopTarget(GatewayTarget):
    name = "gateway-uvloop"
    uvloop = True


class NaiveUvloopTarget(NaiveTarget):
    name = "naive-uvloop"
    loop = "uvloop"


# --------------------------------------------------------------------------- clients


@dataclass
class Window:
    """One measurement window: frames with lo < seq <= hi count."""

    lo: int
    hi: int
    delivered: int = 0
    lat: array[float] = field(default_factory=lambda: array("d"))


class Pool:
    """N picows clients of one target, and what they received."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.clients: list[tuple[Any, Any]] = []  # (WSTransport, listener)
        self.window: Window | None = None
        self.last_rx = 0.0
        self.failures = 0
        self.first_error = ""
        self.ttff: list[float] = []  # connect start -> first frame (or PONG), seconds

    def on_payload(self, listener: Any, head: bytes, now: float) -> None:
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
        t0 = time.perf_counter()
        try:
            transport, listener = await ws_connect(
                lambda: listener_cls(self),
                url,
                websocket_handshake_timeout=CONNECT_TIMEOUT_S,
                max_frame_size=16 * 1024 * 1024,
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
        while time.time() - self.last_rx < QUIET_S:
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
    """A client of the gateway or the naive relay: every text frame is one payload."""

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        mt = frame.msg_type
        if mt is _TEXT or mt is _BINARY:
            now = time.time()
            if not self.ready.done():
                self.ready.set_result(time.perf_counter())
            self.pool.on_payload(self, bytes(frame.get_payload_as_memoryview()[:HEAD]), now)
        elif mt is _CLOSE:
            transport.disconnect()


NATS_HELLO = (
    b'CONNECT {"verbose":false,"pedantic":false,"lang":"python","version":"bench",'
    b'"name":"bench","protocol":1,"headers":false,"no_responders":false}\r\n'
    + f"SUB {SUBJECT} 1\r\nPING\r\n".encode()
)


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


def _masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def open_stalled(url: str, nats_protocol: bool) -> socket.socket:
    """A client that completes the handshake (and, for NATS, subscribes), then never reads.

    A tiny receive buffer makes the server's writes back up within a few frames.
    """
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    if nats_protocol:
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionResetError("nats-server closed the stalled client")
            got += chunk
        sock.sendall(_masked_frame(NATS_HELLO))
    return sock


# --------------------------------------------------------------------------- bench


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: list[dict[str, Any]] = []
        self.seq = 0
        self.nats: Any = None
        self.publisher: Publisher | None = None
        self.targets: dict[str, Target] = {}
        self.pyspy: list[subprocess.Popen[bytes]] = []

    # -- setup

    async def start(self) -> None:
        from gateway.natsserver import NatsServer

        ws_port = free_port()
        conf = self.workdir / "nats.conf"
        conf.write_text(f"websocket {{\n  host: 127.0.0.1\n  port: {ws_port}\n  no_tls: true\n}}\n")
        self.nats = NatsServer(self.workdir / "js", extra_args=["-c", str(conf)])
        _CHILDREN.append(self.nats)
        await asyncio.to_thread(self.nats.start)
        self.publisher = Publisher(self.nats.url)
        await self.publisher.start()
        await self.publish(1, 1000.0, self.args.size)  # creates the stream, primes caches
        makers: dict[str, Callable[[], Target]] = {
            "gateway": lambda: GatewayTarget(self.nats.url, self.workdir),
            "nats": lambda: NatsTarget(self.nats, ws_port),
            "naive": lambda: NaiveTarget(self.nats.url, self.workdir),
            "gateway-uvloop": lambda: GatewayUvloopTarget(self.nats.url, self.workdir),
            "naive-uvloop": lambda: NaiveUvloopTarget(self.nats.url, self.workdir),
        }
        for name, parent in self.args.alt_gateway:
            makers[name] = lambda n=name, d=parent: AltGatewayTarget(
                n, d, self.nats.url, self.workdir
            )
        for name in self.args.targets:
            target = makers[name]()
            await target.start()
            self.targets[name] = target

    async def stop(self) -> None:
        for proc in self.pyspy:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 30)
        for target in self.targets.values():
            await target.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)

    async def publish(self, count: int, rate: float, size: int) -> tuple[int, int, dict[str, Any]]:
        assert self.publisher is not None
        lo = self.seq
        self.seq += count
        reply = await self.publisher.run(lo, count, rate, size)
        return lo, lo + count, reply

    # -- measurement

    def _snapshot(self, target: Target) -> dict[str, float]:
        assert self.publisher is not None
        return {
            "t": time.perf_counter(),
            "server": target.cpu_s(),
            "server_sys": target.cpu_s(kernel_only=True),
            "broker": proc_cpu_s(self.nats.pid),
            "client": own_cpu_s(),
            "publisher": proc_cpu_s(self.publisher.pid),
            "machine": machine_busy_s(),
        }

    async def window(
        self,
        scenario: str,
        target: Target,
        pool: Pool,
        rate: float,
        size: int,
        duration: float,
        **extra: Any,
    ) -> dict[str, Any]:
        """Publish for `duration` s at `rate` Hz and measure what `pool` receives."""
        assert self.publisher is not None
        count = max(1, round(rate * duration))
        lo, hi = self.seq, self.seq + count
        self.seq = hi
        w = Window(lo, hi)
        pool.reset_counts()
        n_clients = pool.live()
        pool.window = w
        spy = self._start_pyspy(target, scenario, n_clients, rate, duration)
        await asyncio.sleep(SETTLE_S)
        s0 = self._snapshot(target)
        reply = await self.publisher.run(lo, count, rate, size)
        expected = reply["sent"] * n_clients
        deadline = time.monotonic() + GRACE_S
        while w.delivered < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        s1 = self._snapshot(target)
        pool.window = None
        rss = target.rss_kib()
        per_client = [lst.n for _, lst in pool.clients]
        drained = await pool.quiesce()
        if spy is not None:
            self.pyspy.append(spy)
        d = {k: s1[k] - s0[k] for k in s0}
        own_broker = target.name != "nats"  # for nats the broker *is* the server
        ours = d["server"] + d["client"] + d["publisher"] + (d["broker"] if own_broker else 0.0)

        def per_1k(cpu: float) -> float | None:
            return round(1000 * cpu / w.delivered, 5) if w.delivered else None

        lat = sorted(w.lat)
        res: dict[str, Any] = {
            "scenario": scenario,
            "target": target.name,
            "clients": n_clients,
            "rate_hz": rate,
            "size": size,
            "duration_s": duration,
            "published": reply["sent"],
            "publish_failed": reply["failed"],
            "publisher_late_max_ms": round(reply["late_max_ms"], 1),
            "publish_s": round(reply["seconds"], 3),  # > duration: the publisher was held up
            "offered_hz": round(reply["sent"] / reply["seconds"], 2) if reply["seconds"] else None,
            "expected": expected,
            "delivered": w.delivered,
            "delivered_pct": round(100 * w.delivered / expected, 2) if expected else None,
            "min_per_client": min(per_client, default=0),
            "lat_ms": {
                "p50": ms(percentile(lat, 0.50)),
                "p90": ms(percentile(lat, 0.90)),
                "p99": ms(percentile(lat, 0.99)),
                "max": ms(lat[-1] if lat else None),
            },
            "wall_s": round(d["t"], 3),
            "frames_per_s": round(w.delivered / d["t"], 1),
            "server_cpu_s": round(d["server"], 3),
            "server_cpu_pct": round(100 * d["server"] / d["t"], 1),
            "server_kernel_share": round(d["server_sys"] / d["server"], 3) if d["server"] else None,
            "server_cpu_s_per_1k": per_1k(d["server"]),
            "broker_cpu_s": round(d["broker"], 3),
            "total_cpu_s_per_1k": per_1k(d["server"] + (d["broker"] if own_broker else 0.0)),
            "server_rss_kib": rss,
            "client_cpu_s": round(d["client"], 3),
            "client_cpu_pct": round(100 * d["client"] / d["t"], 1),
            "publisher_cpu_s": round(d["publisher"], 3),
            "foreign_cpu_pct": round(100 * max(0.0, d["machine"] - ours) / d["t"], 1),
            "drained": drained,
            **extra,
        }
        self.emit(res)
        return res

    def _start_pyspy(
        self, target: Target, scenario: str, n: int, rate: float, duration: float
    ) -> subprocess.Popen[bytes] | None:
        if not self.args.pyspy or target.name == "nats":  # py-spy profiles Python only
            return None
        outdir = Path(self.args.pyspy)
        outdir.mkdir(parents=True, exist_ok=True)
        pyspy = Path(sys.executable).parent / "py-spy"
        stem = outdir / f"{target.name}-{scenario}-{n}x{rate:g}"
        return subprocess.Popen(
            [str(pyspy), "record", "--pid", str(target.pids()[0]), "--duration",
             str(max(1, int(duration))), "--rate", "100", "--format", "raw",
             "-o", f"{stem}.txt"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def fresh_pool(self, target: Target, n: int, size: int, batch: int) -> Pool:
        await self.publish(1, 1000.0, size)  # the cached payload new clients get
        pool = Pool(target)
        await pool.open(n, batch)
        if pool.failures:
            print(f"  ! {target.name}: {pool.failures} of {n} connects failed: {pool.first_error}")
        return pool

    async def recycle(self, target: Target, pool: Pool, res: dict[str, Any]) -> Pool:
        """A target still sending stale frames after a run is restarted, clients reconnected."""
        if res["drained"]:
            return pool
        n = len(pool.clients)
        await pool.close()
        print(f"  ({target.name} still busy {QUIESCE_MAX_S:g}s after the run: restarting it)")
        await target.restart()
        return await self.fresh_pool(target, n, res["size"], self.args.batch)

    # -- scenarios

    async def grid(self) -> None:
        a = self.args
        for n in a.clients:
            for target in self.targets.values():
                pool = await self.fresh_pool(target, n, a.size, a.batch)
                for rate in a.rates:
                    res = await self.window("grid", target, pool, rate, a.size, a.duration)
                    pool = await self.recycle(target, pool, res)
                await pool.close()

    async def stall(self) -> None:
        a = self.args
        for target in self.targets.values():
            pool = await self.fresh_pool(target, a.stall_clients, a.stall_size, a.batch)
            base = await self.window(
                "stall-baseline", target, pool, a.stall_rate, a.stall_size, a.duration, stalled=0
            )
            pool = await self.recycle(target, pool, base)
            socks = await asyncio.gather(
                *(
                    asyncio.to_thread(open_stalled, target.urls()[0], target.protocol == "nats")
                    for _ in range(a.stalled)
                )
            )
            want = len(pool.clients) + a.stalled
            deadline = time.monotonic() + 5
            while (c := await target.connections()) is not None and c < want:
                if time.monotonic() > deadline:
                    print(f"  ! {target.name}: {c} connections, expected {want}")
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(SETTLE_S)
            p99_base = base["lat_ms"]["p99"]
            res = await self.window(
                "stall", target, pool, a.stall_rate, a.stall_size, a.duration, stalled=a.stalled
            )
            p99 = res["lat_ms"]["p99"]
            res["p99_vs_baseline"] = round(p99 / p99_base, 3) if p99 and p99_base else None
            for s in socks:
                s.close()
            pool = await self.recycle(target, pool, res)
            await pool.close()

    async def storm(self) -> None:
        a = self.args
        for target in self.targets.values():
            await self.publish(1, 1000.0, a.size)
            await asyncio.sleep(SETTLE_S)
            pool = Pool(target)
            c0 = target.cpu_s()
            seconds = await pool.open(a.storm_clients, a.storm_concurrency)
            cpu = target.cpu_s() - c0
            ttff = sorted(pool.ttff)
            served = len(pool.clients)
            res = {
                "scenario": "storm",
                "target": target.name,
                "clients": a.storm_clients,
                "concurrency": a.storm_concurrency,
                "served": served,
                "failed": pool.failures,
                "first_error": pool.first_error,
                "seconds": round(seconds, 3),
                "conn_per_s": round(served / seconds, 1),
                "ttff_ms": {
                    "p50": ms(percentile(ttff, 0.5)),
                    "p99": ms(percentile(ttff, 0.99)),
                    "max": ms(ttff[-1] if ttff else None),
                },
                "server_cpu_ms_per_conn": round(1000 * cpu / served, 3) if served else None,
                "served_means": "cached payload received"
                if target.protocol == "relay"
                else "SUB confirmed (PONG); nats has no cache",
            }
            self.emit(res)
            await pool.close()

    async def idle(self) -> None:
        a = self.args
        for target in self.targets.values():
            fresh = target.name != "nats" or not self.results
            if target.name != "nats":
                await target.restart()
            await self.publish(1, 1000.0, a.size)
            await asyncio.sleep(1.0)
            rss0 = target.rss_kib()
            pool = Pool(target)
            await pool.open(a.idle_clients, a.batch)
            await asyncio.sleep(2.0)
            rss1 = target.rss_kib()
            n = len(pool.clients)
            res = {
                "scenario": "idle",
                "target": target.name,
                "clients": n,
                "failed": pool.failures,
                "rss_before_kib": rss0,
                "rss_after_kib": rss1,
                "rss_per_conn_kib": round((rss1 - rss0) / n, 2) if n else None,
                "fresh_process": fresh,
            }
            self.emit(res)
            await pool.close()

    async def workers(self) -> None:
        """The gateway alone at saturation: GATEWAY_WORKERS=1 vs 2, frames/s."""
        a = self.args
        fps: dict[int, float] = {}
        for k in (1, 2):
            target = GatewayTarget(self.nats.url, self.workdir)
            target.workers = k
            await target.start()
            try:
                pool = await self.fresh_pool(target, a.workers_clients, a.size, a.batch)
                # How the kernel spread the connections among the workers:
                spread = [socket_count(pid) for pid in target.pids()[1:]] if k > 1 else []
                res = await self.window(
                    "workers", target, pool, a.workers_rate, a.size, a.duration, workers=k,
                    worker_sockets=spread,
                )  # fmt: skip
                fps[k] = res["frames_per_s"]
                await pool.close()
            finally:
                await target.stop()
        if fps.get(1):
            ratio = round(fps[2] / fps[1], 3)
            self.emit({"scenario": "workers-ratio", "target": "gateway", "fps_2_over_1": ratio})

    # -- output

    def emit(self, res: dict[str, Any]) -> None:
        self.results.append(res)
        print(format_row(res), flush=True)


HEADER = (
    f"{'scenario':<12}{'target':<15}{'N':>6}{'Hz':>5}{'KB':>5}  {'delivered':>17}  "
    f"{'p50':>7}{'p90':>8}{'p99':>8}{'max':>8} ms  {'srvCPU ms/1k':>12}{'srv%':>6}{'tot ms/1k':>10}"
    f"{'RSS MiB':>8}{'cli%':>6}{'oth%':>6}"
)


def format_row(r: dict[str, Any]) -> str:
    sc, tg = r["scenario"], r["target"]
    if sc == "storm":
        t = r["ttff_ms"]
        return (
            f"{sc:<12}{tg:<15}{r['clients']:>6}  served {r['served']}/{r['clients']} in "
            f"{r['seconds']:.2f}s = {r['conn_per_s']:.0f} conn/s; first frame p50 {t['p50']} ms "
            f"p99 {t['p99']} ms; server CPU {r['server_cpu_ms_per_conn']} ms/conn"
        )
    if sc == "idle":
        return (
            f"{sc:<12}{tg:<15}{r['clients']:>6}  RSS {r['rss_before_kib'] / 1024:.1f} -> "
            f"{r['rss_after_kib'] / 1024:.1f} MiB = {r['rss_per_conn_kib']} KiB/connection"
        )
    if sc == "workers-ratio":
        ratio = r["fps_2_over_1"]
        return f"{'workers':<12}{tg:<15}  frames/s with GATEWAY_WORKERS=2 / =1: {ratio}"
    lat = r["lat_ms"]

    def f(x: float | None, width: int) -> str:
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.1f}"

    cpu = r["server_cpu_s_per_1k"]
    tot = r["total_cpu_s_per_1k"]
    deliv = f"{r['delivered']}/{r['expected']}"
    if sc == "stall" or sc == "stall-baseline":
        sc = f"{sc[:9]}+{r.get('stalled', 0)}"
    if sc == "workers":
        sc = f"workers={r.get('workers')}"
    row = (
        f"{sc:<12}{tg:<15}{r['clients']:>6}{r['rate_hz']:>5g}{r['size'] / 1024:>5.0f}  "
        f"{deliv:>11} {r['delivered_pct'] or 0:>5.1f}%  "
        f"{f(lat['p50'], 7)}{f(lat['p90'], 8)}{f(lat['p99'], 8)}{f(lat['max'], 8)}    "
        f"{f(None if cpu is None else cpu * 1000, 12)}{r['server_cpu_pct']:>6.0f}"
        f"{f(None if tot is None else tot * 1000, 10)}"
        f"{r['server_rss_kib'] / 1024:>8.0f}{r['client_cpu_pct']:>6.0f}{r['foreign_cpu_pct']:>6.0f}"
    )
    if not r["drained"]:
        row += "  (backlog)"
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    def floats(s: str) -> list[float]:
        return [float(x) for x in s.split(",") if x]

    def names(choices: Sequence[str]) -> Callable[[str], list[str]]:
        def parse(s: str) -> list[str]:
            out = [c for c in choices if c not in EXTRA_TARGETS] if s == "all" else s.split(",")
            out = [x for x in out if x]
            bad = [x for x in out if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
            return out

        return parse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", type=names(SCENARIOS), default=list(SCENARIOS))
    p.add_argument(
        "--targets",
        type=names(TARGETS + EXTRA_TARGETS),
        default=list(TARGETS),
        help=f"comma list of {', '.join(TARGETS + EXTRA_TARGETS)}; all = the first three",
    )
    p.add_argument("--clients", type=ints, default=[100, 1000, 2000, 2500], help="grid")
    p.add_argument("--rates", type=floats, default=[4, 20, 50], help="grid, Hz")
    p.add_argument("--size", type=int, default=4096, help="payload bytes (grid, storm, idle)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of publishing per run")
    p.add_argument("--batch", type=int, default=250, help="connections opened at a time")
    p.add_argument("--stall-clients", type=int, default=200)
    p.add_argument("--stalled", type=int, default=5)
    p.add_argument("--stall-size", type=int, default=65536)
    p.add_argument("--stall-rate", type=float, default=20)
    p.add_argument("--storm-clients", type=int, default=1000)
    p.add_argument("--storm-concurrency", type=int, default=1000, help="connects in flight")
    p.add_argument("--idle-clients", type=int, default=2000)
    p.add_argument("--workers-clients", type=int, default=2500)
    p.add_argument("--workers-rate", type=float, default=50)
    p.add_argument(
        "--alt-gateway",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run the `gateway` package found in DIR (DIR/gateway/) as target NAME,\n"
        "e.g. a copy with a changed hub.py: side-by-side ratios (repeatable)",
    )
    p.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    p.add_argument("--pyspy", default="", help="record py-spy stacks (raw) of Python targets here")
    p.add_argument("--quick", action="store_true", help="smoke: tiny N, 2 s, grid only")
    a = p.parse_args(argv)
    alts = []
    for spec in a.alt_gateway:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "gateway" / "__init__.py").is_file():
            p.error(f"--alt-gateway {spec!r}: expected NAME=DIR with DIR/gateway/__init__.py")
        alts.append((name, Path(folder).resolve()))
        LABELS[name] = f"gateway package from {Path(folder).resolve()} (what-if)"
    a.alt_gateway = alts
    a.targets += [name for name, _ in alts if name not in a.targets]
    if a.quick:
        a.scenarios = [s for s in a.scenarios if s == "grid"] or ["grid"]
        a.clients, a.rates, a.duration = [5], [10.0], 2.0
    return a


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile()
    need = 2 * max([*args.clients, args.idle_clients, args.storm_clients, args.workers_clients])
    if nofile < need + 100:
        print(f"warning: RLIMIT_NOFILE hard limit {nofile} may be too low for {need} sockets")
    info = machine_info()
    print(
        f"machine: {info['cpu_model']}, {info['nproc']} cores, {info['mem_total_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}, "
        f"loadavg {' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}"
    )
    for name in args.targets:
        print(f"  {name:<14} = {LABELS[name]}")
    print(HEADER, flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            await bench.start()
            order = [s for s in SCENARIOS if s in args.scenarios]  # idle first: fresh processes
            for scenario in order:
                await getattr(bench, scenario)()
        finally:
            await bench.stop()
    params = {k: v for k, v in vars(args).items() if k not in ("out", "pyspy", "alt_gateway")}
    params["alt_gateway"] = {name: str(folder) for name, folder in args.alt_gateway}
    return {
        "bench": "gateway-fanout",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {**info, "loadavg_at_end": os.getloadavg()},
        "gateway_source_at_end": source_identity(),
        "targets": {t: LABELS[t] for t in args.targets},
        "params": params,
        "grace_s": GRACE_S,
        "results": bench.results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publisher"]:
        asyncio.run(publisher_main(argv[1]))
        return 0
    args = parse_args(argv)
    import uvloop

    report = uvloop.run(amain(args))
    line = json.dumps(report, separators=(",", ":"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(line + "\n")
        print(f"saved {path}", file=sys.stderr)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
