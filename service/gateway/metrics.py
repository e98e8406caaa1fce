"""Prometheus metrics: every contract name from SPEC, built on an injected registry.

Nothing is registered at import time; `Metrics(CollectorRegistry())` gives a test its own
set. The names are part of the contract: dashboards and alerts query them.

With several worker processes (`GATEWAY_WORKERS`), prometheus_client's multiprocess mode
is on (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor before the workers start): every
worker writes its values to files there, and each scrape aggregates all workers, so
`/metrics` describes the whole service whichever worker answers. Gauges say how they
combine (`multiprocess_mode`; ignored in a single process).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond to seconds: a broadcast to a few clients takes microseconds, a delivery
# to a stalled one can take the whole send timeout.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

REJECT_REASONS = ("origin", "auth", "capacity", "draining", "handshake_timeout")
# Why a connection ended after its handshake (gateway_connections_closed_total{reason}):
# the peer left (`client`), a send stalled (`send_timeout`), no pong (`ping_timeout`), an
# inbound frame over the limit (`too_big`, 1009), full (`capacity`, 1013), our shutdown
# (`shutdown`, 1001), or anything unexpected while sending (`error`).
CLOSE_REASONS = (
    "client", "send_timeout", "ping_timeout", "too_big", "capacity", "shutdown", "error",
)  # fmt: skip

MultiprocessMode = Literal["livesum", "livemin", "livemax"]


class Metrics:
    """The gateway's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        """Set when several workers share the metrics (see the module docstring)."""
        if process and not self.multiprocess_dir:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=registry)

        def gauge(name: str, doc: str, combine: MultiprocessMode) -> Gauge:
            return Gauge(name, doc, registry=registry, multiprocess_mode=combine)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)

        self.build_info = Gauge(
            "gateway_build_info",
            "Always 1; the labels say which gateway and Python this process runs.",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(metadata.version("gateway"), platform.python_version()).set(1)
        self.messages_received = counter(
            "gateway_messages_received", "Messages taken from NATS (valid or not)."
        )
        self.messages_invalid = counter(
            "gateway_messages_invalid",
            "Messages rejected and not relayed (not a JSON object, too big).",
        )
        self.messages_skipped = counter(
            "gateway_messages_skipped",
            "Messages not relayed because newer ones were already waiting (the relay was behind).",
        )
        self.messages_sent = counter("gateway_messages_sent", "Frames delivered to clients.")
        self.messages_conflated = counter(
            "gateway_messages_conflated",
            "Frames skipped for slow clients because a newer one replaced them.",
        )
        self.send_failures = counter(
            "gateway_send_failures", "Failed or timed-out sends; the client was removed."
        )
        self.connections_active = gauge(
            "gateway_connections_active", "Connected WebSocket clients.", "livesum"
        )
        self.connections_max = gauge(  # sum: with workers, each has its share of the cap
            "gateway_connections_max",
            "The connection cap (GATEWAY_MAX_CONNECTIONS): clients beyond it are refused.",
            "livesum",
        )
        self.connections_total = counter("gateway_connections", "Accepted WebSocket connections.")
        self.connections_by_transport = Gauge(
            "gateway_connections_by_transport",
            "Connected clients by transport: websocket or sse (Server-Sent Events).",
            ["transport"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        for transport in ("websocket", "sse"):
            self.connections_by_transport.labels(transport)
        self.connections_rejected = Counter(
            "gateway_connections_rejected",
            "Refused WebSocket handshakes, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:  # export zeros so rate() works from the first scrape
            self.connections_rejected.labels(reason)
        self.connections_closed = Counter(
            "gateway_connections_closed",
            "WebSocket connections ended after the handshake, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason)
        self.nats_connected = gauge(  # min: 0 as soon as one worker is disconnected
            "gateway_nats_connected", "1 while connected to NATS, else 0.", "livemin"
        )
        self.consumer_shared = gauge(  # max: 1 as soon as one worker sees it
            "gateway_consumer_shared",
            "1 while another process is seen pulling from this gateway's consumer, else 0.",
            "livemax",
        )
        self.consumer_lag = gauge(
            "gateway_consumer_lag", "JetStream num_pending of the gateway's consumer.", "livemax"
        )
        self.last_message_timestamp = gauge(
            "gateway_last_message_timestamp_seconds",
            "JetStream publish time (epoch seconds) of the newest relayed message.",
            "livemax",
        )
        self.broadcast_duration = histogram(
            "gateway_broadcast_duration_seconds",
            "Time to hand one message to every client's mailbox.",
        )
        self.delivery_lag = histogram(
            "gateway_delivery_lag_seconds",
            "JetStream publish time to the frame being written to a client's socket.",
        )

    def exposition(self) -> bytes:
        """The Prometheus text for a scrape: this process, or every worker's aggregated."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        return generate_latest(self._all_workers())

    def service_connections(self, local: int) -> int:
        """Clients connected to the whole service (`local` when there is one process)."""
        if not self.multiprocess_dir:
            return local
        for family in self._all_workers().collect():
            for sample in family.samples:
                if sample.name == "gateway_connections_active":
                    return int(sample.value)
        return local

    def _all_workers(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return registry


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """Record `count` observations of the same `value`, for the price of one.

    A broadcast writes one frame to many clients at the same instant: their delivery lags
    are one value. prometheus_client has no weighted observe, so this adds to the
    histogram's own bucket and sum values (private attributes; a test compares the result
    with `count` calls of `observe` so an upgrade that changes them is caught).
    """
    histogram._sum.inc(value * count)
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets, strict=True):
        if value <= bound:
            bucket.inc(count)
            break
