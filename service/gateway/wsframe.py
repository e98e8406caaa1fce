"""WebSocket frames built once for every client (RFC 6455, RFC 7692). Standard library only.

A server's frames are never masked, so a text frame's bytes are the same for every client
that negotiated the same thing: built once per message, written to each socket as they
are. With permessage-deflate and `server_no_context_takeover` (which the gateway always
asks for), each message is compressed on its own, without the history of earlier ones,
so one compressed frame also serves every client that negotiated compression.
"""

from __future__ import annotations

import zlib

FIN_TEXT = 0x81  # FIN + opcode 1 (text)
FIN_RSV1_TEXT = 0xC1  # FIN + RSV1 ("this message is compressed") + opcode 1
DEFLATE_LEVEL = 6  # zlib's default: the work is once per message, not per client
_SYNC_FLUSH_TAIL = b"\x00\x00\xff\xff"  # removed from each message (RFC 7692 §7.2.1)


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked text frame (FIN set) carrying `payload`."""
    return _header(FIN_TEXT, len(payload)) + payload


def deflated_text_frame(payload: bytes) -> bytes:
    """A complete text frame carrying `payload` compressed per RFC 7692 (RSV1 set).

    A fresh compressor per message (no context takeover) with a 32 KiB window: any peer
    that negotiated permessage-deflate without limiting the server's window inflates it.
    """
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if data.endswith(_SYNC_FLUSH_TAIL):
        data = data[: -len(_SYNC_FLUSH_TAIL)]
    return _header(FIN_RSV1_TEXT, len(data)) + data


def _header(first_byte: int, size: int) -> bytes:
    if size < 126:
        return bytes((first_byte, size))
    if size < 1 << 16:
        return bytes((first_byte, 126)) + size.to_bytes(2, "big")
    return bytes((first_byte, 127)) + size.to_bytes(8, "big")
