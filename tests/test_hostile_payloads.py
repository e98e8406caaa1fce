"""End to end: hostile NATS messages through a real nats-server and the real gateway."""

from __future__ import annotations

import asyncio
import logging
import re

import msgspec
import pytest
import websockets
from prometheus_client import CollectorRegistry

from gateway.natsserver import NatsServer

from conftest import jetstream, make_settings, running_gateway, seconds, wait_until, ws_url

pytestmark = pytest.mark.anyio

MAX_PAYLOAD = 4096


def _at_limit() -> bytes:
    """A valid object of exactly MAX_PAYLOAD bytes."""
    head, tail = b'{"n": 7, "pad": "', b'"}'
    return head + b"x" * (MAX_PAYLOAD - len(head) - len(tail)) + tail


BAD: dict[str, bytes] = {
    "not json": b"not json",
    "string scalar": b'"just a string"',
    "number scalar": b"42",
    "null": b"null",
    "array": b'[{"n": 1}]',
    "invalid utf-8": b'{"a": "\xff\xfe"}',
    "empty": b"",
    "utf-8 bom": b'\xef\xbb\xbf{"a": 1}',
    "deeply nested (under the size limit)": b'{"a":' + b"[" * 1500 + b"]" * 1500 + b"}",
    "one byte over the size limit": b'{"pad": "' + b"x" * MAX_PAYLOAD + b'"}',
    "trailing garbage": b'{"a": 1} trailing',
    "NaN literal": b'{"a": NaN}',
}

GOOD: list[bytes] = [
    msgspec.json.encode({"n": 0}),
    b'{"n": 1, "huge": 1e400, "big": ' + b"9" * 400 + b"}",
    '{"n": 2, "text": "héllo 🎉", "esc": "\\u00e9\\n"}'.encode(),
    b'  {"n": 3}  ',
    _at_limit(),
    b'{"n": 5, "dup": 1, "dup": 2}',
]


def _interleave() -> list[tuple[bool, bytes]]:
    """good, bad, good, bad, ... and good last: every bad one sits between good ones."""
    bad = list(BAD.values())
    mixed: list[tuple[bool, bytes]] = []
    for i, data in enumerate(bad):
        mixed.append((True, GOOD[i % len(GOOD)]))
        mixed.append((False, data))
    mixed.append((True, msgspec.json.encode({"n": "last"})))
    return mixed


async def test_hostile_messages_are_skipped_counted_acked_and_logged(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client gets exactly the good messages in order; each bad one is counted, acked, logged."""
    caplog.set_level(logging.WARNING)
    registry = CollectorRegistry()
    messages = _interleave()
    good = [data for ok, data in messages if ok]
    settings = make_settings(nats_server.url, max_payload_bytes=MAX_PAYLOAD)
    async with (
        running_gateway(settings, registry) as gw,
        jetstream(nats_server.url) as js,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        async with websockets.connect(ws_url(gw), max_size=None) as ws:
            await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
            bad_seqs: list[int] = []
            good_seqs: list[int] = []
            for ok, data in messages:
                ack = await js.publish("levels.signals", data)
                (good_seqs if ok else bad_seqs).append(ack.seq)
            received = [await asyncio.wait_for(ws.recv(decode=False), seconds(5)) for _ in good]
        assert received == good, "exactly the good messages, in order, byte for byte"

        def sample(name: str) -> float:
            return registry.get_sample_value(name) or 0.0

        assert sample("gateway_messages_invalid_total") == len(BAD)
        assert sample("gateway_messages_received_total") == len(messages)
        assert gw.hub.latest_payload == good[-1].decode(), "the cache holds the last good"

        async def all_acked() -> bool:
            info = await js.consumer_info("LEVEL_SIGNALS", "gateway_levels")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(all_acked, what="every message, bad ones too, to be acknowledged")

    rejections = [
        r for r in caplog.records if r.name == "gateway.relay" and "seq=" in r.getMessage()
    ]
    for seq in bad_seqs:
        lines = [r for r in rejections if re.search(rf"\bseq={seq}\b", r.getMessage())]
        assert len(lines) == 1, f"one log line for bad message seq={seq}"
        assert "\n" not in lines[0].getMessage(), "on a single line"
        assert lines[0].levelno >= logging.WARNING
    assert len(rejections) == len(bad_seqs), "no log line for a good message"
