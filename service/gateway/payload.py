"""Payload validation: a NATS message becomes one frame, or is rejected with a reason.

The gateway is a pure relay. It checks once per message that the bytes are a UTF-8 JSON
object within the size limit, and hands every client the same decoded `str`: the frame's
bytes on the wire are exactly the NATS payload's bytes. Nothing is re-serialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

# Decoding into `dict[str, Raw]` checks the whole document's syntax and that the top
# level is an object, without building Python objects for the values.
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])


class InvalidPayload(ValueError):
    """The message is not something the gateway relays; `str(err)` says why."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One validated payload, ready to send to every client as a text frame."""

    text: str
    """The payload decoded once; every client is handed this same object."""
    seq: int
    """JetStream stream sequence of the message it came from."""
    published_at: float
    """JetStream store time, epoch seconds."""


def validate(data: bytes, max_bytes: int) -> str:
    """Return the payload as text if it is a UTF-8 JSON object of at most `max_bytes`."""
    if len(data) > max_bytes:
        raise InvalidPayload(f"payload of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data:
        raise InvalidPayload("empty payload")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        _OBJECT.decode(text)
    except msgspec.ValidationError:
        raise InvalidPayload("JSON but not an object") from None
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"not JSON ({exc})") from None
    except RecursionError:
        raise InvalidPayload("JSON nested too deeply") from None
    return text


def websocket_text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame (FIN set) carrying `payload` (RFC 6455).

    Server-to-client frames are never masked, and with compression off the bytes are the
    same for every client: built once per message, written to each socket as they are.
    """
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload
