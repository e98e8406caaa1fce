"""Frames built once for every client: the bytes match what a WebSocket peer parses."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.metrics import LATENCY_BUCKETS, observe_many
from gateway.payload import Frame as GatewayFrame
from gateway.wsframe import deflated_text_frame, text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_parses_back_with_websockets_own_parser(size: int) -> None:
    """Every length encoding (7-bit, 16-bit, 64-bit) parses as one final text frame."""
    payload = ("é" * size).encode()[:size]
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
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


@pytest.mark.parametrize("size", [0, 1, 100, 4096, 70000])
def test_deflated_frame_inflates_to_the_payload_with_websockets_own_extension(size: int) -> None:
    """A compressed frame (RSV1) decodes, with websockets' permessage-deflate, to the bytes."""
    from websockets.extensions.permessage_deflate import PerMessageDeflate

    payload = (b'{"spot":600.25,"levels":[1,2,3],"pad":"' + b"ab" * size)[:size]
    wire = deflated_text_frame(payload)
    assert wire[0] == 0xC1, "FIN, RSV1, text"
    # The client's side of `server_no_context_takeover`: a fresh inflater per message.
    client = PerMessageDeflate(
        remote_no_context_takeover=True,
        local_no_context_takeover=True,
        remote_max_window_bits=15,
        local_max_window_bits=15,
    )
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False, extensions=[client])
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    else:  # pragma: no cover
        raise AssertionError("incomplete frame")
    assert parsed.fin
    assert parsed.data == payload
    if size >= 4096:
        assert len(wire) < len(payload) / 3, "JSON-like text compresses several-fold"


def test_each_wire_form_is_built_once_per_message() -> None:
    """A frame's WebSocket and event-stream bytes are built on first use, then reused."""
    frame = GatewayFrame('{"a":\n1}', 42, 0.0)
    assert frame.websocket() is frame.websocket()
    assert frame.websocket(deflate=True) is frame.websocket(deflate=True)
    assert frame.event() is frame.event()
    assert frame.event() == b'id: 42\ndata: {"a":\ndata: 1}\n\n'
