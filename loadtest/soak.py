"""Bounded soak: the gateway under churn, steady publishing and a NATS restart, watched for leaks.

Everything runs on loopback and is started (and stopped, by PID) here:

  nats-server   a child process, JetStream in a temp dir; SIGKILLed halfway through the run
                and restarted on the same port with the same store dir
  gateway       `python -m gateway` as a child process (its RSS and fds are what we watch)
  publisher     in this process, `--rate` Hz to `levels.signals`, payloads `{"seq", "ts", "pad"}`
  clients       `--steady` clients connected for the whole run (they must never be dropped,
                must see `seq` strictly increasing, and must get the final message);
                `--churners` loops that connect, read for a random lifetime, close, repeat;
                a new stalled client (a raw socket that never reads and never answers a
                ping) every `--stalled-every` seconds, which the gateway must drop itself

Every `--sample-every` seconds it samples the gateway's VmRSS (/proc/PID/status), open fds
(/proc/PID/fd) and, from /metrics, `gateway_connections_active`, `process_open_fds` and the
frame counters (the gateway's asyncio tasks are not visible from outside: one per client
plus a fixed few, so the connections gauge and the fd count stand in for them).

At the end: churn stops, a final message is published, every healthy client connected at
that moment must receive it, every client leaves, then `gateway_connections_active` must
return to 0 and the fd count to its baseline, the gateway must exit 0 on SIGTERM, and RSS
must show no upward trend after the warm-up. Prints one row per sample, a summary, and one
JSON line; exits 1 if any check failed.

    uv run python loadtest/soak.py                  # 10 minutes
    uv run python loadtest/soak.py --duration 60    # the CI variant (tests/test_soak.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import nats
import nats.errors

from benchkit.children import READY_TIMEOUT_S, GatewayChild
from benchkit.procs import fd_count
from benchkit.rawws import closed_by_peer
from benchkit.soakclients import (
    FINAL_TIMEOUT_S,
    Published,
    Run,
    Stats,
    churn_client,
    publish_final,
    publisher,
    stalled_clients,
    steady_client,
)
from benchkit.soakwatch import HEADER, Sample, row, rss_verdict, scrape, take_sample
from gateway.natsserver import NatsServer

SETTLE_TIMEOUT_S = 15.0  # gauge back to 0 and fds back to baseline within this
FD_SLACK = 2  # fds the gateway may legitimately hold beyond its idle baseline
RSS_TREND_TOLERANCE = 0.05  # second-half growth (regression) allowed, as a share of the median
RSS_END_TOLERANCE = 0.10  # end RSS allowed above the post-warm-up median


async def settle(predicate: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    """Poll an async predicate until true or `within_s` seconds pass."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return bool(await predicate())


@contextlib.contextmanager
def nats_process(store: Path) -> Iterator[list[NatsServer]]:
    """A list holding the current nats-server (replaced on restart); all stopped on exit."""
    servers = [NatsServer(store).start()]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def soak(args: argparse.Namespace) -> dict[str, object]:
    failures: list[str] = []
    rng = random.Random(args.seed)
    duration = float(args.duration)
    warmup = args.warmup if args.warmup is not None else min(60.0, duration / 4)
    with (
        tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp,
        nats_process(Path(tmp) / "nats") as servers,
    ):
        nats_url = servers[0].url
        gw = GatewayChild(
            {
                "NATS_URL": nats_url,
                "GATEWAY_LIVE_VIEW": "0",
                "GATEWAY_DRAIN_S": "0",
                "GATEWAY_PING_INTERVAL_S": str(args.ping_interval),
                "GATEWAY_SEND_TIMEOUT_S": str(args.send_timeout),
            }
        )
        try:
            port = gw.wait_started()
            result = await _drive(args, gw, port, servers, rng, duration, warmup, failures)
        finally:
            gw.stop()
    result["failures"] = failures
    result["ok"] = not failures
    return result


async def _drive(
    args: argparse.Namespace,
    gw: GatewayChild,
    port: int,
    servers: list[NatsServer],
    rng: random.Random,
    duration: float,
    warmup: float,
    failures: list[str],
) -> dict[str, object]:
    """The run itself: load, the NATS restart halfway, the end; returns the report."""
    stats = Stats()
    run = Run(port=port, stats=stats, stop_churn=asyncio.Event())
    published = Published()
    samples: list[Sample] = []
    stalled: list[socket.socket] = []
    settle_s = max(SETTLE_TIMEOUT_S, 3 * args.ping_interval + 5)  # the last stalled one too

    async def quiet(exc: Exception) -> None:
        """The NATS outage is planned: failed reconnect attempts are expected, not news."""

    nc = await nats.connect(
        servers[0].url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        error_cb=quiet,
    )
    async with httpx.AsyncClient(timeout=5.0) as http:

        async def ready() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
            return False

        async def gauge_zero() -> bool:
            return (await scrape(http, port)).get("gateway_connections_active") == 0

        async def fds_back() -> bool:
            return fd_count(gw.pid) <= fds_baseline + FD_SLACK

        if not await settle(ready, READY_TIMEOUT_S):
            raise RuntimeError("gateway never became ready")
        fds_baseline = fd_count(gw.pid)
        t0 = time.monotonic()
        print(HEADER, flush=True)
        samples.append(await take_sample(http, gw, t0))
        print(row(samples[-1]), flush=True)

        # 1. Load: the publisher, then steady, churning and stalled clients.
        js = nc.jetstream()
        publishing = asyncio.create_task(
            publisher(js, args.rate, "x" * args.size, published, run.stop_churn)
        )
        while published.ok == 0:
            await asyncio.sleep(0.05)
        run.data_exists = True
        clients = [asyncio.create_task(steady_client(run)) for _ in range(args.steady)]
        clients += [
            asyncio.create_task(churn_client(run, random.Random(rng.random())))
            for _ in range(args.churners)
        ]
        clients.append(asyncio.create_task(stalled_clients(run, args.stalled_every, stalled)))

        # 2. Sample until the end; NATS is SIGKILLed halfway and restarted (same port, store).
        restarted_at: float | None = None
        next_sample = t0 + args.sample_every
        while (now := time.monotonic()) < t0 + duration:
            if restarted_at is None and now >= t0 + duration / 2:
                restarted_at = now - t0
                nats_port = servers[0].port
                servers[0].stop(signal.SIGKILL)
                await asyncio.sleep(args.nats_down)  # the outage itself, by design
                servers.append(NatsServer(servers[0].store_dir, port=nats_port).start())
                print(f"# nats-server SIGKILLed at {restarted_at:.0f}s, restarted", flush=True)
            await asyncio.sleep(max(0.0, min(next_sample, t0 + duration) - time.monotonic()))
            if time.monotonic() >= next_sample:
                samples.append(await take_sample(http, gw, t0))
                print(row(samples[-1]), flush=True)
                next_sample += args.sample_every

        # 3. The end: churn stops, the final message must reach every healthy client.
        run.stop_churn.set()  # the publisher stops too, within one interval
        await publishing
        run.final_seq = await publish_final(js, published)
        run.final_published.set()
        print(f"# final message published (seq {run.final_seq})", flush=True)  # overruns say where
        done, pending = await asyncio.wait(clients, timeout=FINAL_TIMEOUT_S + 10)
        print(f"# clients finished: {len(done)} of {len(clients)}", flush=True)
        for task in pending:
            task.cancel()
            failures.append("a client task did not finish")
        if pending:  # bounded: a cancel lost in a library's wait_for must not hang the soak
            await asyncio.wait(pending, timeout=5)
        for task in done:
            if (exc := task.exception()) is not None:
                failures.append(f"a client task failed: {type(exc).__name__}: {exc}")
        await nc.close()

        # 4. Healthy clients have left; the stalled ones are still open on our side. The
        #    gateway must drop those itself (pings) and hold no socket beyond its baseline.
        gauge_ok = await settle(gauge_zero, settle_s)
        fds_ok = await settle(fds_back, SETTLE_TIMEOUT_S)
        fds_with_stalled_open = fd_count(gw.pid)
        stalled_dropped = sum(closed_by_peer(sock) for sock in stalled)
        for sock in stalled:
            sock.close()
        samples.append(await take_sample(http, gw, t0))
        print(row(samples[-1]), flush=True)
        final_metrics = await scrape(http, port)

    # 5. SIGTERM: a clean exit.
    gw.proc.send_signal(signal.SIGTERM)
    try:
        exit_code: int | None = await asyncio.to_thread(gw.proc.wait, 15)
    except subprocess.TimeoutExpired:
        exit_code = None

    # --- verdict ---
    rss = rss_verdict(samples[:-1] or samples, warmup, duration)
    if rss["trend_growth"] > RSS_TREND_TOLERANCE * rss["median"]:
        failures.append(
            f"RSS trend: +{rss['trend_growth'] / 2**20:.1f} MiB over the second half "
            f"(> {RSS_TREND_TOLERANCE:.0%} of the {rss['median'] / 2**20:.1f} MiB median)"
        )
    if rss["end"] > (1 + RSS_END_TOLERANCE) * rss["median"]:
        failures.append(
            f"RSS at the end {rss['end'] / 2**20:.1f} MiB > "
            f"{1 + RSS_END_TOLERANCE:.2f} x post-warm-up median {rss['median'] / 2**20:.1f} MiB"
        )
    if not gauge_ok:
        failures.append("gateway_connections_active did not return to 0")
    if not fds_ok:
        failures.append(
            f"fds {fds_with_stalled_open} did not return to baseline {fds_baseline} "
            f"(+{FD_SLACK}) with the dropped stalled clients still open on our side"
        )
    if stalled and stalled_dropped != len(stalled):
        failures.append(f"stalled clients closed by the gateway: {stalled_dropped}/{len(stalled)}")
    if stats.final_received != stats.final_expected:
        failures.append(
            f"final message reached {stats.final_received}/{stats.final_expected} healthy clients"
        )
    if stats.unexpected_closes:
        failures.append(
            f"{len(stats.unexpected_closes)} healthy clients closed unexpectedly, "
            f"first: {stats.unexpected_closes[0]}"
        )
    if stats.order_violations:
        failures.append(f"{stats.order_violations} frames out of order or repeated")
    if stats.no_frame:
        failures.append(f"{stats.no_frame} churn clients got no frame (not even the cache)")
    if final_metrics.get("gateway_nats_connected") != 1:
        failures.append("the gateway was not connected to NATS at the end")
    if exit_code != 0:
        failures.append(f"gateway exit code on SIGTERM: {exit_code}")
    crashes = gw.count("Traceback") + gw.count("unexpected error")
    if crashes:
        failures.append(f"{crashes} tracebacks or unexpected errors in the gateway's log")

    first = sorted(stats.first_frame_s)

    def mb(x: float) -> float:
        return round(x / 2**20, 1)

    def ms(q: float) -> float | None:
        return round(1000 * first[min(len(first) - 1, int(len(first) * q))], 1) if first else None

    return {
        "soak": "gateway",
        "duration_s": duration,
        "warmup_s": warmup,
        "rate_hz": args.rate,
        "payload_bytes": args.size,
        "nats_restart_at_s": round(restarted_at or 0.0, 1),
        "samples": len(samples),
        "rss_start_mb": mb(rss["start"]),
        "rss_warm_median_mb": mb(rss["median"]),
        "rss_end_mb": mb(rss["end"]),
        "rss_max_mb": mb(rss["max"]),
        "rss_trend_mb_per_h": round(rss["slope_per_s"] * 3600 / 2**20, 1),
        "fds_baseline": fds_baseline,
        "fds_peak": max(s.fds for s in samples),
        "fds_end": fds_with_stalled_open,
        "fds_after_all_closed": samples[-1].fds,
        "connections_peak": max(s.active for s in samples),
        "connections_end": samples[-1].active,
        "client_connects": stats.connects,
        "frames_received": stats.frames,
        "frames_sent_by_gateway": final_metrics.get("gateway_messages_sent_total"),
        "frames_conflated": final_metrics.get("gateway_messages_conflated_total"),
        "send_failures": final_metrics.get("gateway_send_failures_total"),
        "first_frame_ms_p50": ms(0.5),
        "first_frame_ms_p99": ms(0.99),
        "published": published.ok,
        "publish_failures": published.failed,
        "final_received": stats.final_received,
        "final_expected": stats.final_expected,
        "stalled_opened": len(stalled),
        "stalled_closed_by_gateway": stalled_dropped,
        "rebind_warnings": gw.count("rebinding"),
        "exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--rate", type=float, default=4.0, help="publish rate, Hz (default 4)")
    parser.add_argument("--size", type=int, default=512, help="payload padding, bytes")
    parser.add_argument("--steady", type=int, default=5, help="clients for the whole run")
    parser.add_argument("--churners", type=int, default=20, help="concurrent churn loops")
    parser.add_argument("--stalled-every", type=float, default=5.0, help="s between stalled")
    parser.add_argument("--sample-every", type=float, default=None, help="s between samples")
    parser.add_argument("--warmup", type=float, default=None, help="s (default min(60, 25%%))")
    parser.add_argument("--nats-down", type=float, default=2.0, help="s NATS stays down")
    parser.add_argument("--ping-interval", type=float, default=5.0, help="GATEWAY_PING_INTERVAL_S")
    parser.add_argument("--send-timeout", type=float, default=5.0, help="GATEWAY_SEND_TIMEOUT_S")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the churn")
    args = parser.parse_args(argv)
    if args.sample_every is None:
        args.sample_every = max(2.0, min(10.0, args.duration / 30))
    result = asyncio.run(soak(args))
    print()
    for key, value in result.items():
        if key != "failures":
            print(f"  {key:28} {value}")
    failures = result["failures"]
    assert isinstance(failures, list)
    for failure in failures:
        print(f"  FAIL: {failure}")
    print("  OK" if result["ok"] else "  SOAK FAILED")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
