"""What tracing costs per NATS message: the relay's per-message path, tracing off vs on.

Drives `Ingest.handle` (validate, cache, fan out to K client mailboxes, ack) with
in-memory messages, so only the gateway's own CPU is measured: no sockets, no NATS. With
tracing on, each message gets the consumer span (continuing a `traceparent` header) and
the fan-out span, batched to an exporter that drops them (export happens off the event
loop, in the SDK's thread). Prints a table and one JSON line.

    uv run python loadtest/tracing_cost.py [--clients 1000] [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from gateway.hub import SocketBroadcaster
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.payload import Frame
from gateway.publisher import make_payload
from gateway.settings import Settings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class DropExporter(SpanExporter):
    """Accepts every span and keeps none: the SDK's cost without a collector's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NullSink:
    """A client whose socket takes every frame at once (the hub's direct-write path)."""

    async def send(self, frame: Frame) -> None:
        pass

    async def close(self, code: int) -> None:
        pass

    def write_now(self, frame: Frame) -> bool:
        return True

    def abort(self) -> None:
        pass


@dataclass
class _Seq:
    stream: int


@dataclass
class _Meta:
    sequence: _Seq
    timestamp: dt.datetime
    num_pending: int = 0


@dataclass
class FakeMsg:
    """The parts of a nats-py JetStream message the relay reads."""

    data: bytes
    metadata: _Meta
    headers: dict[str, str] = field(default_factory=lambda: {"traceparent": TRACEPARENT})

    async def ack(self) -> None:
        pass


async def per_message_us(traced: bool, clients: int, messages: list[FakeMsg]) -> float:
    metrics = Metrics(CollectorRegistry(), process=False)
    hub = SocketBroadcaster(metrics, send_timeout_s=5.0)
    for _ in range(clients):
        hub.connect(NullSink())  # no sockets: this measures the hand-off, not the kernel
    provider = TracerProvider() if traced else None
    if provider is not None:
        provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=65536))
    ingest = Ingest(Settings(), hub, metrics, provider.get_tracer("bench") if provider else None)
    started = time.perf_counter()
    for msg in messages:
        await ingest.handle(msg)  # the per-message path is what we measure
    elapsed = time.perf_counter() - started
    if provider is not None:
        provider.shutdown()
    return elapsed / len(messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=4096, help="payload bytes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    now = dt.datetime.now(dt.UTC)
    payload = make_payload(1, now.timestamp(), args.size)
    results: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):  # interleaved rounds: machine noise hits both sides alike
        for mode in ("off", "on"):
            messages = [
                FakeMsg(payload, _Meta(_Seq(seq), now)) for seq in range(1, args.messages + 1)
            ]
            cost = asyncio.run(per_message_us(mode == "on", args.clients, messages))
            results[mode].append(cost)
    off, on = (statistics.median(results[m]) for m in ("off", "on"))
    summary = {
        "clients": args.clients,
        "payload_bytes": len(payload),
        "messages": args.messages,
        "us_per_message_off": round(off, 2),
        "us_per_message_on": round(on, 2),
        "tracing_overhead_us": round(on - off, 2),
        "tracing_overhead_pct": round((on - off) / off * 100, 1),
    }
    print(f"{'clients':>8} {'bytes':>6} {'off µs/msg':>11} {'on µs/msg':>10} {'overhead':>14}")
    print(
        f"{args.clients:>8} {len(payload):>6} {off:>11.1f} {on:>10.1f} "
        f"{on - off:>7.1f} µs {summary['tracing_overhead_pct']:>4}%"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
