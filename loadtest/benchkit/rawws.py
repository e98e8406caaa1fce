"""WebSocket on a raw socket: the stalled client's handshake (once, for bench and soak),
masked client frames, and what a client offers for permessage-deflate."""

from __future__ import annotations

import base64
import os
import socket

from benchkit.pubchild import SUBJECT

# picows has no permessage-deflate of its own, but it sends extra handshake headers and
# shows each frame's RSV1 bit: that is all a receiving client needs (RFC 7692). The
# gateway answers with server_no_context_takeover, so every message inflates on its own.
DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


DEFLATE_TAIL = b"\x00\x00\xff\xff"


def frame_header_len(size: int) -> int:
    """Bytes of an unmasked server frame's header for a payload of `size` bytes."""
    return 2 if size < 126 else 4 if size < 1 << 16 else 10


NATS_HELLO = (
    b'CONNECT {"verbose":false,"pedantic":false,"lang":"python","version":"bench",'
    b'"name":"bench","protocol":1,"headers":false,"no_responders":false}\r\n'
    + f"SUB {SUBJECT} 1\r\nPING\r\n".encode()
)


def _masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def open_stalled(url: str, nats_protocol: bool = False) -> socket.socket:
    """A client that completes the handshake (and, for NATS, subscribes), then never reads.

    A tiny receive buffer makes the server's writes back up within a few frames.
    """
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    if nats_protocol:
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionResetError("nats-server closed the stalled client")
            got += chunk
        sock.sendall(_masked_frame(NATS_HELLO))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the gateway has closed this stalled socket (reads what is still buffered)."""
    sock.settimeout(1.0)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False  # still open: data stopped coming, no end of stream
    except OSError:
        return True  # reset
    return True
