"""Summaries and tables: percentiles, late messages, median and worst runs, one table per point."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchkit.clients import Window
from benchkit.rawws import frame_header_len


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def per_message(w: Window, slowest: int = 3) -> dict[str, Any]:
    """Which messages were late: the `slowest` by their median-over-clients latency.

    A message the server held back reaches every client late, so its median is high; a
    client-side hiccup moves one client's frames only. `n` is the message's place in the
    window (1..N), `seq` its sequence number.
    """
    by_seq: dict[int, list[float]] = {}
    for seq, lat in zip(w.seqs, w.lat, strict=True):
        by_seq.setdefault(seq, []).append(lat)
    rows = []
    for seq, lats in by_seq.items():
        lats.sort()
        rows.append((lats[len(lats) // 2], lats[-1], seq, len(lats)))
    rows.sort(reverse=True)
    medians = sorted(r[0] for r in rows)
    return {
        "messages": w.hi - w.lo,
        "messages_seen": len(rows),
        "median_of_medians_ms": ms(percentile(medians, 0.5)),
        "slowest": [
            {"n": seq - w.lo, "seq": seq, "median_ms": ms(med), "max_ms": ms(mx), "clients": k}
            for med, mx, seq, k in rows[:slowest]
        ],
    }


def _f(x: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def progress_line(r: dict[str, Any]) -> str:
    lat = r["lat_ms"]
    return (
        f"  {r['scenario']} {r['target']} {r['clients']}x{r['rate_hz']:g}Hz run {r['repeat']}: "
        f"{r['delivered_pct']}% p99 {lat['p99']} max {lat['max']} ms "
        f"(load1 {r['loadavg_1m_before']})"
    )


def rank(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(median run, worst run) by p99, then max; a run missing frames is worse than any."""

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        lat = r["lat_ms"]
        return (-(r["delivered_pct"] or 0), lat["p99"] or 1e9, lat["max"] or 1e9)

    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2], ordered[-1]


def slowest_text(r: dict[str, Any]) -> str:
    pm = r["per_message"]
    return ", ".join(
        f"#{m['n']}/{pm['messages']} {m['median_ms']:.0f} ({m['max_ms']:.0f})"
        for m in pm["slowest"]
    )


def point_table(runs: list[dict[str, Any]]) -> str:
    """One table for one point: every run, then each target's median and worst run."""
    r0 = runs[0]
    msgs = r0["per_message"]["messages"]
    out = [
        "",
        f"== {r0['scenario']}: {r0['clients']} clients x {r0['rate_hz']:g} Hz x {r0['size']} B "
        f"({r0['shape']} payload), {msgs} messages = {r0['duration_s']:g} s per run, "
        f"{max(r['repeat'] for r in runs)} runs per target",
        f"{'target':<11}{'run':<9}{'delivered':>9}{'p50':>7}{'p99':>7}{'max':>7} ms"
        f"{'us/frame':>9}{'B/frame':>8}{'load1':>6}{'oth%':>5}  "
        "slowest messages #n/N: median over clients (max) ms",
    ]
    by_target: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_target.setdefault(r["target"], []).append(r)

    def line(r: dict[str, Any], label: str) -> str:
        lat, cpu = r["lat_ms"], r["server_cpu_s_per_1k"]
        return (
            f"{r['target']:<11}{label:<9}{r['delivered_pct'] or 0:>8.1f}%"
            f"{_f(lat['p50'], 7)}{_f(lat['p99'], 7)}{_f(lat['max'], 7)}   "
            f"{_f(None if cpu is None else cpu * 1000, 9)}{_f(r['wire_bytes_per_frame'], 8, 0)}"
            f"{r['loadavg_1m_before']:>6.2f}{r['foreign_cpu_pct']:>5.0f}  {slowest_text(r)}"
            + ("" if r["drained"] else "  (backlog)")
        )

    for rs in by_target.values():
        out += [line(r, f"{r['repeat']}") for r in rs]
        med, worst = rank(rs)
        out += [line(med, f"median={med['repeat']}"), line(worst, f"worst={worst['repeat']}")]
    out += compare_lines(by_target)
    return "\n".join(out)


def compare_lines(by_target: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The first target against each other one: run by run, and worst against worst."""
    names = list(by_target)
    if len(names) < 2:
        return []
    a = names[0]
    out = []
    for b in names[1:]:
        pairs = list(zip(by_target[a], by_target[b], strict=False))

        def ratio(x: float | None, y: float | None) -> float | None:
            return round(x / y, 2) if x and y else None

        p99s = [ratio(x["lat_ms"]["p99"], y["lat_ms"]["p99"]) for x, y in pairs]
        maxs = [ratio(x["lat_ms"]["max"], y["lat_ms"]["max"]) for x, y in pairs]
        cpus = [ratio(x["server_cpu_s_per_1k"], y["server_cpu_s_per_1k"]) for x, y in pairs]
        wa, wb = rank(by_target[a])[1], rank(by_target[b])[1]
        out.append(
            f"{a} / {b}, run by run: p99 {p99s} (<= 1.0 in "
            f"{sum(1 for x in p99s if x is not None and x <= 1.0)}/{len(pairs)}), "
            f"max {maxs} (<= 2.0 in {sum(1 for x in maxs if x is not None and x <= 2.0)}"
            f"/{len(pairs)}), CPU/frame {cpus}; worst vs worst: p99 "
            f"{ratio(wa['lat_ms']['p99'], wb['lat_ms']['p99'])}, max "
            f"{ratio(wa['lat_ms']['max'], wb['lat_ms']['max'])}"
        )
    return out


def bytes_table(results: list[dict[str, Any]]) -> str:
    """Wire bytes per frame for each payload, compression off vs on."""
    rows = [r for r in results if r["scenario"] == "deflate-bytes"]
    out = [
        "",
        "== deflate: WebSocket frame bytes on the wire (header + payload), per frame",
        f"{'payload':<30}{'JSON B':>8}{'off B':>8}{'on B':>8}{'on/off':>8}{'RSV1 frames':>13}",
    ]
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["shape"], r["size"]), {})[r["target"]] = r
    for (shape, size), by in pairs.items():
        off, on = by.get("gw-off"), by.get("gw-deflate")
        if off is None or on is None:
            continue
        b_off, b_on = off["wire_bytes_per_frame"], on["wire_bytes_per_frame"]
        json_b = b_off - frame_header_len(int(b_off) - 2) if b_off else None
        name = {"pad": f"make_payload size={size}", "levels": f"realistic levels ~{size}"}[shape]
        if shape == "pad" and size == 0:
            name = "make_payload (default, small)"
        out.append(
            f"{name:<30}{_f(json_b, 8, 0)}{_f(b_off, 8, 0)}{_f(b_on, 8, 0)}"
            f"{_f(b_on / b_off if b_on and b_off else None, 8, 3)}"
            f"{on['deflated_frames']:>7}/{on['delivered']}"
        )
    return "\n".join(out)


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
    if sc in ("idle", "idle-deflate"):
        return (
            f"{sc:<13}{tg:<14}{r['clients']:>6}  RSS {r['rss_before_kib'] / 1024:.1f} -> "
            f"{r['rss_after_kib'] / 1024:.1f} MiB = {r['rss_per_conn_kib']} KiB/connection"
            + (f"  (run {r['repeat']}, load1 {r['loadavg_1m']})" if "repeat" in r else "")
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
