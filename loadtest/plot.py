"""PNG plots from `bench.py` results: p99 latency and CPU per 1000 frames vs clients.

    uv run python loadtest/plot.py               # newest loadtest/results/bench-*.json with a grid
    uv run python loadtest/plot.py results.json --out /tmp/plots
    uv run python loadtest/plot.py --tables                # the results as Markdown tables

One panel per publish rate, one line per target (gateway, nats-server, naive relay).
A hollow marker is a run where not every frame was delivered within the grace period.
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
    rows = grid_rows(report)
    rates = sorted({r["rate_hz"] for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for target, style in STYLE.items():
            pts = sorted(
                (r["clients"], pick(r, value), r["delivered"] == r["expected"])
                for r in rows
                if r["target"] == target and r["rate_hz"] == rate and pick(r, value) is not None
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, color=style["color"], label=style["label"], linewidth=1.5)
            for x, y, complete in pts:
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
    """One row per clients x rate: the three targets next to each other, and the ratios."""
    runs = {(r["clients"], r["rate_hz"], r["target"]): r for r in res if r["scenario"] == "grid"}
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


def markdown_tables(report: dict[str, Any]) -> str:
    """The results as Markdown tables, for docs/performance.md."""
    res = report["results"]
    out = [*side_by_side(res), "", "All grid runs:", ""]
    out += [
        "| clients | Hz | target | delivered | p50 ms | p90 ms | p99 ms | max ms "
        "| CPU ms/1k frames | server CPU % | RSS MiB | client CPU % | others' CPU % |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in res if r["scenario"] == "grid"):
        lat, cpu = r["lat_ms"], r["server_cpu_s_per_1k"]
        out.append(
            f"| {r['clients']} | {r['rate_hz']:g} | {r['target']} "
            f"| {r['delivered_pct']:.1f}% | {_fmt(lat['p50'])} | {_fmt(lat['p90'])} "
            f"| {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
            f"| {_fmt(None if cpu is None else cpu * 1000)} | {r['server_cpu_pct']:.0f} "
            f"| {r['server_rss_kib'] / 1024:.0f} | {r['client_cpu_pct']:.0f} "
            f"| {r['foreign_cpu_pct']:.0f} |"
        )
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
    idle = [r for r in res if r["scenario"] == "idle"]
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
