"""PNG plots from `bench.py` results: p99 latency and CPU per 1000 frames vs clients.

    uv run python loadtest/plot.py               # newest loadtest/results/bench-*.json with a grid
    uv run python loadtest/plot.py results.json --out /tmp/plots
    uv run python loadtest/plot.py --tables                # the results as Markdown tables

One panel per publish rate, one line per target (gateway, nats-server, naive relay),
through each point's median run; a bar from the median run up to the worst run (by p99)
shows the spread of the repeats. A hollow marker is a point where not every frame of the
median run was delivered within the grace period.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): no display needed

HERE = Path(__file__).resolve().parent
STYLE = {
    "gateway": {"color": "tab:blue", "marker": "o", "label": "gateway"},
    "nats": {"color": "tab:green", "marker": "s", "label": "nats-server WS (Go)"},
    "naive": {"color": "tab:red", "marker": "^", "label": "naive relay (seed, baseline)"},
}


def load(path: Path) -> dict[str, Any]:
    """A bench result file: the JSON line `bench.py` prints (the last JSON line wins)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def grid_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["scenario"] == "grid"]


def _badness(r: dict[str, Any]) -> tuple[float, float, float]:
    lat = r["lat_ms"]
    return (-(r["delivered_pct"] or 0), lat["p99"] or 1e9, lat["max"] or 1e9)


def points(
    rows: list[dict[str, Any]],
) -> dict[tuple[int, float, str], tuple[dict[str, Any], dict[str, Any], int]]:
    """(clients, Hz, target) -> (median run, worst run, runs), as bench.py ranks them.

    Ranked by p99, then max; a run that missed frames ranks worse than any that did not.
    Results from before `--repeats` have one run per point: it is median and worst.
    """
    groups: dict[tuple[int, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["clients"], r["rate_hz"], r["target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        ordered = sorted(rs, key=_badness)
        out[key] = (ordered[(len(ordered) - 1) // 2], ordered[-1], len(ordered))
    return out


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"{m['cpu_model']}, {m['nproc']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"{report['params']['size']} B payloads, {report['params']['duration']:g} s per run"
    )


def panel_plot(
    report: dict[str, Any],
    value: str,
    ylabel: str,
    title: str,
    out: Path,
    *,
    logy: bool = False,
) -> Path:
    pts_all = points(grid_rows(report))
    rates = sorted({rate for _, rate, _ in pts_all})
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for target, style in STYLE.items():
            pts = sorted(
                (n, pick(med, value), med["delivered"] == med["expected"], pick(worst, value))
                for (n, hz, tg), (med, worst, _) in pts_all.items()
                if tg == target and hz == rate and pick(med, value) is not None
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, color=style["color"], label=style["label"], linewidth=1.5)
            for x, y, _, top in pts:
                if top is not None and y is not None and top > y:
                    ax.vlines(x, y, top, color=style["color"], linewidth=1, alpha=0.6)
            for x, y, complete, _ in pts:
                ax.plot(
                    x,
                    y,
                    marker=style["marker"],
                    color=style["color"],
                    markerfacecolor=style["color"] if complete else "white",
                    markersize=7,
                )
        ax.set_title(f"{rate:g} Hz")
        ax.set_xlabel("clients")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0 if not logy else None)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}\n{machine_line(report)}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pick(row: dict[str, Any], value: str) -> float | None:
    if value == "p99":
        return row["lat_ms"]["p99"]  # type: ignore[no-any-return]
    v = row.get(value)
    return None if v is None else float(v) * 1000  # seconds per 1k frames -> ms


def plot_all(report: dict[str, Any], outdir: Path) -> list[Path]:
    return [
        panel_plot(
            report,
            "p99",
            "p99 publish -> receive latency (ms, log)",
            "p99 latency vs clients (hollow: not every frame delivered)",
            outdir / "p99_latency_vs_clients.png",
            logy=True,
        ),
        panel_plot(
            report,
            "server_cpu_s_per_1k",
            "server CPU ms per 1000 delivered frames",
            "Fan-out process CPU per 1000 delivered frames vs clients",
            outdir / "cpu_per_1k_frames_vs_clients.png",
        ),
    ]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def side_by_side(res: list[dict[str, Any]]) -> list[str]:
    """One row per clients x rate: the three targets' median runs, and the ratios."""
    runs = {k: med for k, (med, _, _) in points(grid_rows({"results": res})).items()}
    cells = sorted({(c, hz) for c, hz, _ in runs})
    names = ("gateway", "nats", "naive")
    out = [
        "| clients x Hz | delivered gw / nats / naive | p99 ms gw / nats / naive "
        "| CPU ms/1k gw / nats / naive | CPU gw:nats | CPU gw:naive |",
        "|---|---|---|---|---:|---:|",
    ]

    def cpu(r: dict[str, Any] | None) -> float | None:
        v = None if r is None else r["server_cpu_s_per_1k"]
        return None if v is None else v * 1000

    for clients, hz in cells:
        rs = [runs.get((clients, hz, n)) for n in names]
        deliv = " / ".join("-" if r is None else f"{r['delivered_pct']:.0f}%" for r in rs)
        p99 = " / ".join("-" if r is None else _fmt(r["lat_ms"]["p99"]) for r in rs)
        cpus = [cpu(r) for r in rs]
        gw, nats, naive = cpus

        def ratio(a: float | None, b: float | None) -> str:
            return "-" if a is None or not b else f"{a / b:.2f}"

        out.append(
            f"| {clients} x {hz:g} | {deliv} | {p99} | {' / '.join(_fmt(c) for c in cpus)} "
            f"| {ratio(gw, nats)} | {ratio(gw, naive)} |"
        )
    return out


def slowest(r: dict[str, Any]) -> str:
    """The late messages of a run: `#n/N median-over-clients (max) ms`, slowest first."""
    pm = r.get("per_message")
    if not pm:
        return "-"
    return ", ".join(
        f"#{m['n']}/{pm['messages']} {m['median_ms']:.0f} ({m['max_ms']:.0f})"
        for m in pm["slowest"]
    )


def point_tables(res: list[dict[str, Any]], scenario: str) -> list[str]:
    """Per point and target: the median run and the worst run, side by side."""
    rows = [r for r in res if r["scenario"] == scenario]
    if not rows:
        return []
    out = [
        "| clients x Hz | target | runs | run | delivered | p50 ms | p99 ms | max ms "
        "| CPU µs/frame | B/frame | load 1 min | others' CPU % | slowest messages #n/N: "
        "median over clients (max) ms |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (n, hz, target), (med, worst, k) in sorted(points(rows).items()):
        for label, r in (("median", med), ("worst", worst)):
            lat, cpu = r["lat_ms"], r["server_cpu_s_per_1k"]
            out.append(
                f"| {n} x {hz:g} | {target} | {k} | {label} (run {r.get('repeat', 1)}) "
                f"| {r['delivered_pct']:.1f}% | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} "
                f"| {_fmt(lat['max'])} | {_fmt(None if cpu is None else cpu * 1000)} "
                f"| {_fmt(r.get('wire_bytes_per_frame'), 0)} "
                f"| {_fmt(r.get('loadavg_1m_before'), 2)} | {r['foreign_cpu_pct']:.0f} "
                f"| {slowest(r)} |"
            )
    return out


def all_runs(res: list[dict[str, Any]], scenarios: tuple[str, ...]) -> list[str]:
    out = [
        "| clients | Hz | target | run | delivered | p50 ms | p90 ms | p99 ms | max ms "
        "| CPU ms/1k frames | server CPU % | RSS MiB | client CPU % | others' CPU % "
        "| load 1 min |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in res if r["scenario"] in scenarios):
        lat, cpu = r["lat_ms"], r["server_cpu_s_per_1k"]
        out.append(
            f"| {r['clients']} | {r['rate_hz']:g} | {r['target']} | {r.get('repeat', 1)} "
            f"| {r['delivered_pct']:.1f}% | {_fmt(lat['p50'])} | {_fmt(lat['p90'])} "
            f"| {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
            f"| {_fmt(None if cpu is None else cpu * 1000)} | {r['server_cpu_pct']:.0f} "
            f"| {r['server_rss_kib'] / 1024:.0f} | {r['client_cpu_pct']:.0f} "
            f"| {r['foreign_cpu_pct']:.0f} | {_fmt(r.get('loadavg_1m_before'), 2)} |"
        )
    return out


def deflate_tables(res: list[dict[str, Any]]) -> list[str]:
    """Compression off vs on: bytes per frame per payload, then idle RSS per connection."""
    out: list[str] = []
    sized = [r for r in res if r["scenario"] == "deflate-bytes"]
    if sized:
        out += [
            "",
            "| payload | off: B/frame | on: B/frame | on / off | frames compressed |",
            "|---|---:|---:|---:|---:|",
        ]
        by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for r in sized:
            by.setdefault((r["shape"], r["size"]), {})[r["target"]] = r
        for (shape, size), pair in by.items():
            off, on = pair.get("gw-off"), pair.get("gw-deflate")
            if off is None or on is None:
                continue
            a, b = off["wire_bytes_per_frame"], on["wire_bytes_per_frame"]
            name = "make_payload, default (small)" if shape == "pad" and not size else (
                f"make_payload padded to {size} B with 'x'" if shape == "pad"
                else f"realistic levels, ~{size} B"
            )  # fmt: skip
            out.append(
                f"| {name} | {_fmt(a, 0)} | {_fmt(b, 0)} | {_fmt(b / a if a and b else None, 3)} "
                f"| {on['deflated_frames']}/{on['delivered']} |"
            )
    idle = [r for r in res if r["scenario"] in ("idle", "idle-deflate") and "repeat" in r]
    if idle:
        out += [
            "",
            "| server | clients offer deflate | run | idle clients | RSS before MiB "
            "| RSS after MiB | KiB per connection | load 1 min |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in idle:
            out.append(
                f"| {r['target']} | {'yes' if r['deflate_clients'] else 'no'} | {r['repeat']} "
                f"| {r['clients']} | {r['rss_before_kib'] / 1024:.1f} "
                f"| {r['rss_after_kib'] / 1024:.1f} | {_fmt(r['rss_per_conn_kib'])} "
                f"| {_fmt(r['loadavg_1m'], 2)} |"
            )
    return out


def markdown_tables(report: dict[str, Any]) -> str:
    """The results as Markdown tables, for docs/performance.md."""
    res = report["results"]
    out = [*side_by_side(res), "", "Median and worst run per point:", ""]
    out += point_tables(res, "grid")
    if any(r["scenario"] == "deflate" for r in res):
        out += ["", "Compression off vs on (the gateway alone):", ""]
        out += point_tables(res, "deflate")
        out += deflate_tables(res)
    out += ["", "All runs:", ""]
    out += all_runs(res, ("grid", "deflate"))
    stall = [r for r in res if r["scenario"] in ("stall-baseline", "stall")]
    if stall:
        out += [
            "",
            "| target | stalled clients | healthy delivered | p50 ms | p99 ms | p99 vs no-stall "
            "| CPU ms/1k frames |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in stall:
            cpu = r["server_cpu_s_per_1k"]
            out.append(
                f"| {r['target']} | {r['stalled']} | {r['delivered']}/{r['expected']} "
                f"({r['delivered_pct']:.1f}%) | {_fmt(r['lat_ms']['p50'])} "
                f"| {_fmt(r['lat_ms']['p99'])} | {_fmt(r.get('p99_vs_baseline'), 2)} "
                f"| {_fmt(None if cpu is None else cpu * 1000)} |"
            )
    storm = [r for r in res if r["scenario"] == "storm"]
    if storm:
        out += [
            "",
            "| target | connections | served | conn/s | first frame p50 ms | p99 ms "
            "| server CPU ms/conn |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in storm:
            t = r["ttff_ms"]
            out.append(
                f"| {r['target']} | {r['clients']} | {r['served']} | {r['conn_per_s']:.0f} "
                f"| {_fmt(t['p50'])} | {_fmt(t['p99'])} | {_fmt(r['server_cpu_ms_per_conn'], 2)} |"
            )
    idle = [r for r in res if r["scenario"] == "idle" and "repeat" not in r]
    if idle:
        out += [
            "",
            "| target | idle clients | RSS before MiB | RSS after MiB | KiB per connection |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in idle:
            out.append(
                f"| {r['target']} | {r['clients']} | {r['rss_before_kib'] / 1024:.1f} "
                f"| {r['rss_after_kib'] / 1024:.1f} | {_fmt(r['rss_per_conn_kib'])} |"
            )
    workers = [r for r in res if r["scenario"] == "workers"]
    if workers:
        out += [
            "",
            "| GATEWAY_WORKERS | clients x Hz | delivered | frames/s | p50 ms | server CPU % "
            "| CPU ms/1k frames | sockets per worker |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in workers:
            cpu = r["server_cpu_s_per_1k"]
            spread = ", ".join(str(n) for n in r.get("worker_sockets") or [] if n) or "-"
            out.append(
                f"| {r['workers']} | {r['clients']} x {r['rate_hz']:g} | {r['delivered_pct']:.1f}% "
                f"| {r['frames_per_s']:.0f} | {_fmt(r['lat_ms']['p50'])} "
                f"| {r['server_cpu_pct']:.0f} | {_fmt(None if cpu is None else cpu * 1000)} "
                f"| {spread} |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("result", nargs="?", help="bench JSON (default: newest in loadtest/results)")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "performance"))
    p.add_argument("--tables", action="store_true", help="print Markdown tables, no plots")
    a = p.parse_args(argv)
    if a.result:
        path = Path(a.result)
    else:
        found = [f for f in sorted((HERE / "results").glob("bench-*.json")) if grid_rows(load(f))]
        if not found:
            p.error("no loadtest/results/bench-*.json with grid runs; run loadtest/bench.py")
        path = found[-1]
    if a.tables:
        print(markdown_tables(load(path)))
        return 0
    for out in plot_all(load(path), Path(a.out)):
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
