"""Prometheus metrics: every contract name from SPEC, built on an injected registry.

Nothing is registered at import time; `Metrics(CollectorRegistry())` gives a test its own
set. The names are part of the contract: dashboards and alerts query them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# Sub-millisecond to seconds: a broadcast to a few clients takes microseconds, a delivery
# to a stalled one can take the whole send timeout.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

REJECT_REASONS = ("origin", "auth", "capacity", "draining")


class Metrics:
    """The gateway's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)

        self.messages_received = counter(
            "gateway_messages_received", "Messages taken from NATS (valid or not)."
        )
        self.messages_invalid = counter(
            "gateway_messages_invalid",
            "Messages rejected and not relayed (not a JSON object, too big).",
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
            "gateway_connections_active", "Connected WebSocket clients."
        )
        self.connections_total = counter("gateway_connections", "Accepted WebSocket connections.")
        self.connections_rejected = Counter(
            "gateway_connections_rejected",
            "Refused WebSocket handshakes, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:  # export zeros so rate() works from the first scrape
            self.connections_rejected.labels(reason)
        self.nats_connected = gauge("gateway_nats_connected", "1 while connected to NATS, else 0.")
        self.consumer_lag = gauge(
            "gateway_consumer_lag", "JetStream num_pending of the gateway's consumer."
        )
        self.last_message_timestamp = gauge(
            "gateway_last_message_timestamp_seconds",
            "JetStream publish time (epoch seconds) of the newest relayed message.",
        )
        self.broadcast_duration = histogram(
            "gateway_broadcast_duration_seconds",
            "Time to hand one message to every client's mailbox.",
        )
        self.delivery_lag = histogram(
            "gateway_delivery_lag_seconds",
            "JetStream publish time to the frame being written to a client's socket.",
        )
