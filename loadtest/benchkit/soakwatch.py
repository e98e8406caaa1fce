"""What the soak watches in the gateway: RSS, fds and /metrics samples, and the RSS trend."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import httpx

from benchkit.children import GatewayChild
from benchkit.procs import fd_count, rss_bytes

_SAMPLE = re.compile(r"^([a-z_]+)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$")


async def scrape(http: httpx.AsyncClient, port: int) -> dict[str, float]:
    """Unlabelled samples (and the first of each labelled family) from /metrics."""
    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if (match := _SAMPLE.match(line)) is not None:
            values.setdefault(match.group(1), float(match.group(2)))
    return values


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    active: float
    open_fds: float
    sent: float
    conflated: float
    failures: float
    nats: float


HEADER = (
    f"{'t_s':>6} {'rss_mb':>7} {'fds':>5} {'active':>6} {'open_fds':>8} "
    f"{'sent':>9} {'conflated':>9} {'fail':>5} {'nats':>4}"
)


def row(s: Sample) -> str:
    return (
        f"{s.t:6.0f} {s.rss / 2**20:7.1f} {s.fds:5d} {s.active:6.0f} {s.open_fds:8.0f} "
        f"{s.sent:9.0f} {s.conflated:9.0f} {s.failures:5.0f} {s.nats:4.0f}"
    )


async def take_sample(http: httpx.AsyncClient, gw: GatewayChild, t0: float) -> Sample:
    m = await scrape(http, gw.wait_started())
    return Sample(
        t=time.monotonic() - t0,
        rss=rss_bytes(gw.pid),
        fds=fd_count(gw.pid),
        active=m.get("gateway_connections_active", -1),
        open_fds=m.get("process_open_fds", -1),
        sent=m.get("gateway_messages_sent_total", -1),
        conflated=m.get("gateway_messages_conflated_total", -1),
        failures=m.get("gateway_send_failures_total", -1),
        nats=m.get("gateway_nats_connected", -1),
    )


def slope_per_s(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in points) / den


def rss_verdict(samples: list[Sample], warmup_s: float, duration_s: float) -> dict[str, float]:
    post = [s for s in samples if s.t >= warmup_s] or samples
    second = [s for s in samples if s.t >= duration_s / 2] or post
    median = statistics.median(s.rss for s in post)
    slope = slope_per_s([(s.t, float(s.rss)) for s in second])
    window = second[-1].t - second[0].t
    return {
        "median": median,
        "slope_per_s": slope,
        "trend_growth": slope * window,  # what the trend adds over the second half
        "end": float(samples[-1].rss),
        "start": float(samples[0].rss),
        "max": float(max(s.rss for s in samples)),
    }
