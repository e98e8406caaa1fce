"""Frames built once for every client: the bytes match what a WebSocket peer parses."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.metrics import LATENCY_BUCKETS, observe_many
from gateway.payload import websocket_text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_parses_back_with_websockets_own_parser(size: int) -> None:
    """Every length encoding (7-bit, 16-bit, 64-bit) parses as one final text frame."""
    payload = ("é" * size).encode()[:size]
    reader = StreamReader()
    reader.feed_data(websocket_text_frame(payload))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    else:  # pragma: no cover - the parser wanted more bytes than the frame has
        raise AssertionError("incomplete frame")
    assert parsed.opcode is Opcode.TEXT
    assert parsed.fin
    assert parsed.data == payload


@pytest.mark.parametrize("value", [0.0, 0.00007, 0.003, 0.25, 7.0, 99.0])
def test_observe_many_equals_repeated_observe(value: float) -> None:
    """observe_many(h, v, n) leaves the histogram exactly as n calls of observe(v) would."""
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("lag_seconds", "x", buckets=LATENCY_BUCKETS, registry=one)
    h_many = Histogram("lag_seconds", "x", buckets=LATENCY_BUCKETS, registry=many)
    for _ in range(5):
        h_one.observe(value)
    observe_many(h_many, value, 5)

    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples(many) == samples(one)
