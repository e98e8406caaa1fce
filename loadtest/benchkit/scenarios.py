"""The bench's scenarios: grid, stall, storm, idle, workers, deflate (see bench.py)."""

from __future__ import annotations

import asyncio
import os
import time

from benchkit.clients import Pool
from benchkit.procs import socket_count
from benchkit.rawws import open_stalled
from benchkit.report import bytes_table, ms, percentile
from benchkit.runner import SETTLE_S, Runner
from benchkit.targets import GatewayTarget, Target


class Bench(Runner):
    async def grid(self) -> None:
        a = self.args
        for n in a.clients:
            for rate in a.rates:
                targets = [(t, False) for t in self.targets.values()]
                await self.point("grid", targets, n, rate, a.size, a.shape)

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

    async def deflate(self) -> None:
        """permessage-deflate on vs off, the gateway alone: bytes, CPU, latency, idle RSS."""
        a = self.args
        plain = GatewayTarget(self.nats.url, self.workdir, name="gw-off", compression="off")
        comp = GatewayTarget(self.nats.url, self.workdir, name="gw-deflate", compression="on")
        for t in (plain, comp):
            await t.start()
        try:
            # 1. Wire bytes per frame, per payload: a few clients, a few messages.
            for shape, size in (("pad", 0), ("pad", a.size), ("levels", a.size)):
                for target, deflate in ((plain, False), (comp, True)):
                    pool = await self.fresh_pool(target, 20, size, a.batch, deflate=deflate)
                    res = await self.window(
                        "deflate-bytes", target, pool, 10.0, size, a.bytes_s, shape=shape,
                        show=False,
                        deflate_clients=deflate,
                    )  # fmt: skip
                    await self.closed(target, pool, res)
            print(bytes_table(self.results), flush=True)
            # 2. The load point, off vs on, alternating: CPU per frame and latency.
            for n in a.deflate_clients:
                await self.point(
                    "deflate", [(comp, True), (plain, False)], n, a.deflate_rate, a.size,
                    a.deflate_shape,
                )  # fmt: skip
            # 3. Idle RSS per connection, each on a fresh process.
            for rep in range(1, (1 if a.quick else a.repeats) + 1):
                for target, deflate in ((plain, False), (comp, True), (comp, False)):
                    await self.idle_rss(target, a.idle_clients, deflate, rep)
        finally:
            for t in (plain, comp):
                await t.stop()

    async def idle_rss(self, target: Target, n: int, deflate: bool, rep: int = 1) -> None:
        """RSS growth of a fresh `target` over `n` idle clients, per connection."""
        a = self.args
        await target.restart()
        await self.publish(1, 1000.0, a.size)
        await asyncio.sleep(a.idle_settle_s)
        rss0 = target.rss_kib()
        pool = Pool(target, deflate=deflate)
        await pool.open(n, a.batch)
        await asyncio.sleep(2 * a.idle_settle_s)
        rss1 = target.rss_kib()
        opened = len(pool.clients)
        res = {
            "scenario": "idle-deflate" if deflate else "idle",
            "target": target.name,
            "clients": opened,
            "deflate_clients": deflate,
            "repeat": rep,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "failed": pool.failures,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_per_conn_kib": round((rss1 - rss0) / opened, 2) if opened else None,
            "fresh_process": True,
        }
        self.emit(res)
        await pool.close()
