"""The per-message path: which JetStream messages become frames, handed to the sink.

Falling behind: a message with more than MAX_BEHIND newer messages already waiting is
acked and skipped (counted), so an overloaded gateway sends fresh state late rather than
stale state later and later.

Sequence floor: the ingest remembers the stream sequence of the state it last offered.
A message at or below it (a resume backlog after a restart, a redelivery, the newest
message seen again when rebinding) is acked and skipped, so clients never get a burst of
stale or repeated frames; every newer message is relayed in order. The relay resets the
floor only when the stream itself was reset.

Every message is acknowledged, relayed or not; an invalid one is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from gateway import tracing
from gateway.metrics import Metrics
from gateway.payload import Frame, InvalidPayload, validate
from gateway.settings import Settings

log = logging.getLogger("gateway.relay")  # the relay's voice, as in natslink.py

# A message with more than this many newer ones already waiting is skipped, not relayed:
# small bursts pass whole, a relay that fell behind catches up to the newest state.
MAX_BEHIND = 8


class FrameSink(Protocol):
    """Where relayed frames go: the hub (or a recording fake in tests)."""

    def broadcast(self, frame: Frame) -> int:
        """Hand `frame` to every client; return how many older frames it replaced."""

    @property
    def client_count(self) -> int:
        """Clients connected now."""


class Ingest:
    """Turns JetStream messages into frames for the sink: skip, floor, validate, fan out."""

    def __init__(
        self,
        settings: Settings,
        sink: FrameSink,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.subject = settings.subject
        self.max_payload_bytes = settings.max_payload_bytes
        self.sink = sink
        self.metrics = metrics
        self.tracer = tracer
        """None when tracing is off: then no tracing call is made at all."""
        self.floor = 0
        """Stream sequence of the newest state offered; nothing at or below it is relayed."""
        self.group: str | None = None
        """The durable consumer in use, named in consumer spans (None for an ephemeral)."""

    async def handle(self, msg: Msg) -> None:
        """Relay one pulled message if it is current, then acknowledge it."""
        self.metrics.messages_received.inc()
        meta = msg.metadata
        seq, published_at = meta.sequence.stream, meta.timestamp.timestamp()
        if meta.num_pending > MAX_BEHIND:
            # The relay is behind (overload, or a backlog): newer states are already
            # waiting, so this one is stale. Skipping it bounds how old a frame can be.
            self.metrics.messages_skipped.inc()
            self.floor = max(self.floor, seq)
            await msg.ack()
            return
        if self.tracer is None:
            relayed = self.offer(seq, msg.data, published_at)
        else:
            with tracing.consumer_span(
                self.tracer, msg.headers, self.subject, seq, len(msg.data), self.group
            ):
                relayed = self.offer(seq, msg.data, published_at)
        await msg.ack()
        if relayed:
            # Let every woken writer run before the next message: a client whose socket
            # takes the frame at once gets every frame; only one that is still busy
            # sending has it replaced (conflation).
            await asyncio.sleep(0)

    def offer(self, seq: int, data: bytes, published_at: float) -> bool:
        """Relay the message if it is newer than the current state and valid."""
        if seq <= self.floor:
            return False
        self.floor = seq
        try:
            text = validate(data, self.max_payload_bytes)
        except InvalidPayload as exc:
            self.metrics.messages_invalid.inc()
            log.warning("message seq=%d on %s rejected: %s", seq, self.subject, exc)
            span = trace.get_current_span()  # the consumer span, or a no-op when tracing is off
            span.set_status(StatusCode.ERROR, str(exc))
            span.set_attribute("error.type", "invalid_payload")
            return False
        frame = Frame(text, seq, published_at)
        if self.tracer is None:
            self.sink.broadcast(frame)
        else:
            clients = self.sink.client_count
            with self.tracer.start_as_current_span(
                f"fanout {self.subject}", attributes={"gateway.fanout.clients": clients}
            ) as span:
                span.set_attribute("gateway.fanout.conflated", self.sink.broadcast(frame))
        self.metrics.last_message_timestamp.set(published_at)
        return True
