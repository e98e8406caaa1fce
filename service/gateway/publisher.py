"""The synthetic publisher: `levels.signals` payloads shaped like the Core service's.

Used by `gateway demo`, the compose stack and the load tests. Each payload carries `ts`
(publish time, epoch seconds) and `seq`, so a client can measure latency and spot gaps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import nats
from opentelemetry.sdk.trace import TracerProvider

from gateway import tracing
from gateway.streams import ensure_stream

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
LEVEL_KINDS = ("support", "resistance", "gamma_wall", "vwap", "pivot")


def spot_price(now: float, rng: random.Random) -> float:
    """A synthetic SPY spot: a slow sine around 600, plus noise."""
    return round(600 + 5 * math.sin(now / 60) + rng.uniform(-0.25, 0.25), 2)


def document(seq: int, now: float, spot: float, levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The `levels.signals.v1` document around `levels` (the bench grows its own list)."""
    return {
        "schema": "levels.signals.v1",
        "ts": now,
        "seq": seq,
        "spy": {"spot": spot, "bid": round(spot - 0.01, 2), "ask": round(spot + 0.01, 2)},
        "levels": levels,
        "viewport": {"min": round(spot - 10, 2), "max": round(spot + 10, 2)},
    }


def make_payload(seq: int, now: float, size: int = 0, rng: random.Random | None = None) -> bytes:
    """One payload: `ts`, `seq`, `spy.spot`, `levels[]`, `viewport`; padded to ~`size` bytes."""
    rng = rng or random.Random(seq)
    spot = spot_price(now, rng)
    levels: list[dict[str, Any]] = [
        {
            "price": round(spot + offset, 2),
            "kind": LEVEL_KINDS[i % len(LEVEL_KINDS)],
            "strength": round(rng.random(), 3),
        }
        for i, offset in enumerate((-6, -3.5, -1.25, 1.5, 3.75, 6.5))
    ]
    doc = document(seq, now, spot, levels)
    data = _encode(doc)
    if size > len(data):
        doc["pad"] = "x" * (size - len(data) - len(',"pad":""'))
        data = _encode(doc)
    return data


async def publish(
    servers: Sequence[str],
    *,
    stream: str,
    subject: str,
    rate_hz: float = 4.0,
    size: int = 0,
    count: int | None = None,
    tracer_provider: TracerProvider | None = None,
    stream_replicas: int = 1,
) -> int:
    """Publish at `rate_hz` until `count` messages (None = until cancelled); return how many.

    With a tracer provider each message is sent inside a PRODUCER span whose context
    travels in the message headers (`traceparent`), so the gateway continues the trace.
    """

    async def on_error(exc: Exception) -> None:
        log.debug("NATS error: %s: %s", type(exc).__name__, exc)

    nc = await nats.connect(
        servers=list(servers),
        name="gateway-publisher",
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        error_cb=on_error,
    )
    tracer = tracer_provider.get_tracer("gateway.publisher") if tracer_provider else None
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream, subject, stream_replicas)
        interval = 1.0 / rate_hz
        next_at = time.monotonic()
        sent = 0
        while count is None or sent < count:
            sent += 1
            payload = make_payload(sent, time.time(), size)
            try:
                if tracer is None:
                    await js.publish(subject, payload, timeout=2.0)
                else:
                    with tracing.producer_span(tracer, subject, len(payload)) as headers:
                        await js.publish(subject, payload, timeout=2.0, headers=headers)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("publish %d failed: %s", sent, exc)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        return sent
    finally:
        if nc.is_connected:
            await nc.drain()
        else:
            await nc.close()
