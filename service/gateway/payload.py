"""Payload validation: a NATS message becomes one frame, or is rejected with a reason.

The gateway is a pure relay. It checks once per message that the bytes are a UTF-8 JSON
object within the size limit, and hands every client the same decoded `str`: the frame's
bytes on the wire are exactly the NATS payload's bytes. Nothing is re-serialized.
"""

from __future__ import annotations

import msgspec

from gateway import wsframe

# Decoding into `dict[str, Raw]` checks the whole document's syntax and that the top
# level is an object, without building Python objects for the values.
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])


class InvalidPayload(ValueError):
    """The message is not something the gateway relays; `str(err)` says why."""


class Frame:
    """One validated payload, ready to send to every client.

    Each wire form (a WebSocket frame, plain or compressed; a Server-Sent Event) is built
    on first use and kept: once per message, whatever the number of clients, and never
    for a transport no client uses.
    """

    __slots__ = ("_deflated", "_event", "_plain", "published_at", "seq", "text")

    def __init__(self, text: str, seq: int, published_at: float) -> None:
        self.text = text
        """The payload decoded once; every client is handed this same object."""
        self.seq = seq
        """JetStream stream sequence of the message it came from."""
        self.published_at = published_at
        """JetStream store time, epoch seconds."""
        self._plain: bytes | None = None
        self._deflated: bytes | None = None
        self._event: bytes | None = None

    def websocket(self, *, deflate: bool = False) -> bytes:
        """The WebSocket text frame for every client, compressed or not (RFC 7692)."""
        if deflate:
            if self._deflated is None:
                self._deflated = wsframe.deflated_text_frame(self.text.encode())
            return self._deflated
        if self._plain is None:
            self._plain = wsframe.text_frame(self.text.encode())
        return self._plain

    def event(self) -> bytes:
        """The Server-Sent Event: `id:` the stream sequence, one `data:` line per line."""
        if self._event is None:
            lines = self.text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            data = "".join(f"data: {line}\n" for line in lines)
            self._event = f"id: {self.seq}\n{data}\n".encode()
        return self._event

    def __repr__(self) -> str:
        return f"Frame(seq={self.seq}, {len(self.text)} chars)"


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
