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
(/proc/stat busy minus ours; a noisy neighbour is visible too), the 1-minute load average
before the run, and the run's 3 slowest messages (`#n/N`, by their median latency over
all clients, with the max): a message held back by the server is named, not averaged.

Every grid and deflate point runs `--repeats` times (default 3), alternating the targets,
each run on freshly opened clients, for `--duration` s (default 15: 60 messages at 4 Hz,
long enough for periodic events), and prints one table: every run, then each target's
median run and worst run (by p99, then max), and the targets' ratios run by run.

Scenarios (`--scenarios`, default all):
  idle      RSS per idle connection (fresh processes, N idle clients)
  storm     connect storm: N connections as fast as possible, each must get the cached
            payload (nats: no cache, so "served" = subscription confirmed by PONG)
  stall     M clients + K raw TCP clients that complete the handshake and never read
            (64 KB x 20 Hz), against a no-stall run on the same connections
  grid      clients x rates x size (`--shape pad|levels`: "x"-padded or realistic payload)
  deflate   the gateway alone, GATEWAY_WS_COMPRESSION=off (plain clients) vs on (clients
            offer permessage-deflate): wire bytes per frame for three payloads, the
            `--deflate-clients` x `--deflate-rate` point (CPU per frame, p99/max), and
            idle RSS per connection on fresh processes
  workers   the gateway alone at the grid's largest load: GATEWAY_WORKERS=1 vs 2 (two
            processes on one socket, each its own consumer): frames/s ratio

Everything is on loopback and bounded in time: a frame not received within GRACE_S of the
last publish counts as not delivered. Child processes are started here and stopped here,
by PID. Prints a table per point (a row per run for the other scenarios), then one JSON
line with everything (also saved in --out, default loadtest/results/). The pieces live in
loadtest/benchkit/ (shared with soak.py), one noun per module.

    uv run python loadtest/bench.py --scenarios grid --targets gateway,nats --clients 2000 --rates 4
    uv run python loadtest/bench.py --scenarios deflate --targets gateway    # ~3 min
    uv run python loadtest/bench.py --quick                      # ~25 s, tiny N
    uv run python loadtest/bench.py                              # everything: about an hour
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchkit.clients import QUIET_S
from benchkit.procs import machine_info, raise_nofile, source_identity
from benchkit.report import HEADER
from benchkit.runner import GRACE_S, SETTLE_S
from benchkit.scenarios import Bench

HERE = Path(__file__).resolve().parent


TARGETS = ("gateway", "nats", "naive")


EXTRA_TARGETS = ("gateway-uvloop", "naive-uvloop")  # what-if variants, only when asked for


SCENARIOS = ("idle", "storm", "stall", "grid", "deflate", "workers")


LABELS = {
    "gateway": "gateway (python -m gateway)",
    "nats": "nats-server WebSocket listener (Go reference)",
    "naive": "naive relay (seed design, BASELINE)",
    "gateway-uvloop": "gateway, unchanged code, run on uvloop (what-if)",
    "naive-uvloop": "naive relay on uvloop (what-if)",
    "gw-off": "gateway, GATEWAY_WS_COMPRESSION=off, clients plain (deflate scenario)",
    "gw-deflate": "gateway, GATEWAY_WS_COMPRESSION=on, clients offer deflate (deflate scenario)",
}


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
    p.add_argument(
        "--duration",
        type=float,
        default=15.0,
        help="seconds of publishing per run (>= 15 s so a periodic stall shows)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per target at every point")
    p.add_argument(
        "--shape",
        choices=("pad", "levels"),
        default="pad",
        help="payload: pad = gateway.publisher.make_payload padded with 'x' to --size;\n"
        "levels = realistic, more levels with varied numbers up to --size",
    )
    p.add_argument("--deflate-clients", type=ints, default=[2000], help="deflate scenario")
    p.add_argument("--deflate-rate", type=float, default=4, help="deflate scenario, Hz")
    p.add_argument("--deflate-shape", choices=("pad", "levels"), default="levels")
    p.add_argument("--bytes-s", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--full-inflate",
        action="store_true",
        help="deflate clients inflate whole frames (as a browser would), not only the\n"
        "head they are timed by: costs the shared client process ~8 µs per 4 KB frame",
    )
    p.add_argument("--batch", type=int, default=250, help="connections opened at a time")
    p.add_argument("--stall-clients", type=int, default=200)
    p.add_argument("--stalled", type=int, default=5)
    p.add_argument("--stall-size", type=int, default=65536)
    p.add_argument("--stall-rate", type=float, default=20)
    p.add_argument("--storm-clients", type=int, default=1000)
    p.add_argument("--storm-concurrency", type=int, default=1000, help="connects in flight")
    p.add_argument("--idle-clients", type=int, default=2000)
    p.add_argument("--idle-settle-s", type=float, default=1.0, help="idle: pause before RSS")
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
    p.add_argument(
        "--quick", action="store_true", help="smoke: tiny N, short runs, grid and deflate only"
    )
    p.add_argument("--quiet-s", type=float, default=QUIET_S, help=argparse.SUPPRESS)
    p.add_argument("--settle-s", type=float, default=SETTLE_S, help=argparse.SUPPRESS)
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
        a.scenarios = [s for s in a.scenarios if s in ("grid", "deflate")] or ["grid"]
        a.clients, a.rates, a.duration, a.repeats = [5], [10.0], 0.5, 2
        a.quiet_s, a.settle_s, a.bytes_s, a.full_inflate = 0.2, 0.1, 0.5, True
        a.deflate_clients, a.deflate_rate, a.idle_clients, a.idle_settle_s = [5], 10.0, 5, 0.2
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
