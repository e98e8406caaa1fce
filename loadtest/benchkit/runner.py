"""One run of the bench: NATS, the publisher and the targets; a measurement window; a point.

`Runner.window` publishes for D seconds at R Hz and measures what a pool of clients got:
delivered frames, latency percentiles, the slowest messages, CPU per frame of the server,
the broker, the client and everyone else. `Runner.point` repeats that, alternating the
targets, and prints the point's table. The scenarios are in `benchkit.scenarios`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchkit.children import CHILDREN, free_port
from benchkit.clients import QUIESCE_MAX_S, Pool, Window
from benchkit.procs import machine_busy_s, own_cpu_s, proc_cpu_s
from benchkit.pubchild import Publisher
from benchkit.report import format_row, ms, per_message, percentile, point_table, progress_line
from benchkit.targets import (
    AltGatewayTarget,
    GatewayTarget,
    GatewayUvloopTarget,
    NaiveTarget,
    NaiveUvloopTarget,
    NatsTarget,
    Target,
)

GRACE_S = 3.0  # a frame later than this after the last publish is "not delivered"
SETTLE_S = 0.3


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: list[dict[str, Any]] = []
        self.seq = 0
        self.nats: Any = None
        self.publisher: Publisher | None = None
        self.targets: dict[str, Target] = {}
        self.pyspy: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        from gateway.natsserver import NatsServer

        ws_port = free_port()
        conf = self.workdir / "nats.conf"
        conf.write_text(f"websocket {{\n  host: 127.0.0.1\n  port: {ws_port}\n  no_tls: true\n}}\n")
        self.nats = NatsServer(self.workdir / "js", extra_args=["-c", str(conf)])
        CHILDREN.append(self.nats)
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
        *,
        shape: str | None = None,
        show: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """Publish for `duration` s at `rate` Hz and measure what `pool` receives."""
        assert self.publisher is not None
        count = max(1, round(rate * duration))
        load1 = os.getloadavg()[0]  # the machine's, before this run adds its own load
        lo, hi = self.seq, self.seq + count
        self.seq = hi
        w = Window(lo, hi)
        pool.reset_counts()
        n_clients = pool.live()
        pool.window = w
        spy = self._start_pyspy(target, scenario, n_clients, rate, duration)
        await asyncio.sleep(self.args.settle_s)
        s0 = self._snapshot(target)
        shape = shape or self.args.shape
        reply = await self.publisher.run(lo, count, rate, size, shape)
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
            "shape": shape,
            "duration_s": duration,
            "loadavg_1m_before": round(load1, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
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
            "per_message": per_message(w),
            "wire_bytes_per_frame": (
                round(w.wire_bytes / w.delivered, 1) if w.delivered and w.wire_bytes else None
            ),
            "deflated_frames": w.deflated,
            "inflate": "full" if pool.full_inflate else "head",
            "inflate_errors": pool.inflate_errors,
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
        self.emit(res, show)
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

    async def fresh_pool(
        self, target: Target, n: int, size: int, batch: int, *, deflate: bool = False
    ) -> Pool:
        await self.publish(1, 1000.0, size)  # the cached payload new clients get
        pool = Pool(
            target, deflate=deflate, full_inflate=self.args.full_inflate, quiet_s=self.args.quiet_s
        )
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

    async def closed(self, target: Target, pool: Pool, res: dict[str, Any]) -> None:
        """Close `pool`; restart a target still busy after the run; wait for its sockets."""
        await pool.close()
        if not res["drained"]:
            print(f"  ({target.name} still busy {QUIESCE_MAX_S:g}s after the run: restarting it)")
            await target.restart()
        deadline = time.monotonic() + 10
        while await target.connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(self.args.settle_s)

    async def point(
        self,
        scenario: str,
        targets: Sequence[tuple[Target, bool]],
        n: int,
        rate: float,
        size: int,
        shape: str,
    ) -> list[dict[str, Any]]:
        """`--repeats` runs of every (target, deflate-clients) at one point, then its table.

        Runs alternate between the targets (a, b, a, b, ...), each on freshly opened
        clients, so a neighbour's busy minute lands on both and no target carries the
        previous run's sockets. Only one target has clients at a time.
        """
        a = self.args
        runs = []
        for rep in range(1, a.repeats + 1):
            for target, deflate in targets:
                pool = await self.fresh_pool(target, n, size, a.batch, deflate=deflate)
                res = await self.window(
                    scenario, target, pool, rate, size, a.duration, shape=shape, show=False,
                    repeat=rep, deflate_clients=deflate,
                )  # fmt: skip
                await self.closed(target, pool, res)
                runs.append(res)
                print(progress_line(res), file=sys.stderr, flush=True)
        print(point_table(runs), flush=True)
        return runs

    def emit(self, res: dict[str, Any], show: bool = True) -> None:
        self.results.append(res)
        if show:
            print(format_row(res), flush=True)
