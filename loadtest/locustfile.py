"""Locust load test of `/ws/stream`: every user is one WebSocket client.

Each user opens a plain WebSocket (websocket-client, which gevent makes cooperative) and a
reader greenlet records every frame as a Locust request event:

  WS connect     the handshake (response time = handshake time); failures are reported
  WS snapshot    the first frame, the cached payload a new client gets at once (it is old
                 by design, so it is kept out of the live-frame percentiles)
  WS message     every later frame: response time = publish -> receive latency from the
                 payload's `ts` (epoch seconds; load generator and publisher must share a
                 clock, e.g. the same host), response length = frame size in bytes
  WS disconnect  the server closed the connection or it broke (a failure); the user
                 reconnects on its next task run

Against `uv run gateway demo` (embedded NATS + a 4 Hz publisher):

    GATEWAY_PORT=8010 uv run gateway demo &
    uv run locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 15s \
        --host ws://127.0.0.1:8010 --only-summary

Against the compose stack: `--host ws://localhost:8000`. `--host http://...` works too.
Environment: WS_PATH (default /ws/stream), GATEWAY_AUTH_TOKEN (sent as `?token=`).
Thousands of users: raise `ulimit -n` and add `--processes N` (gevent uses one core).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any
from urllib.parse import quote

import gevent
import websocket
from locust import User, constant, task

WS_PATH = os.environ.get("WS_PATH", "/ws/stream")
TOKEN = os.environ.get("GATEWAY_AUTH_TOKEN", "")
CONNECT_TIMEOUT_S = 10.0


def stream_url(host: str) -> str:
    base = host.rstrip("/")
    for plain, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(plain):
            base = ws + base.removeprefix(plain)
    url = base + WS_PATH
    return f"{url}?token={quote(TOKEN)}" if TOKEN else url


def latency_ms(frame: str | bytes) -> float | None:
    """Publish -> now, from the payload's `ts`; None if the frame has no usable `ts`."""
    try:
        ts = json.loads(frame).get("ts")
    except (ValueError, AttributeError):
        return None
    if not isinstance(ts, int | float):
        return None
    return max(0.0, (time.time() - ts) * 1000)


class StreamUser(User):
    """One WebSocket client of the gateway's `/ws/stream`."""

    wait_time = constant(1)  # the task only checks the connection; frames are read below

    def on_start(self) -> None:
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.stopping = False
        self._connect()

    def _fire(self, name: str, ms: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    def _connect(self) -> None:
        t0 = time.perf_counter()
        try:
            self.ws = websocket.create_connection(
                stream_url(self.host or ""), timeout=CONNECT_TIMEOUT_S, enable_multithread=False
            )
        except Exception as exc:
            self.ws = None
            self._fire("connect", (time.perf_counter() - t0) * 1000, 0, exc)
            return
        self.ws.settimeout(None)  # frames arrive at the publisher's pace; block in recv
        self._fire("connect", (time.perf_counter() - t0) * 1000, 0, None)
        self.reader = gevent.spawn(self._read, self.ws)

    def _read(self, ws: websocket.WebSocket) -> None:
        first = True
        while True:
            try:
                frame: Any = ws.recv()
            except Exception as exc:
                if not self.stopping:
                    self._fire("disconnect", 0, 0, exc)
                return
            if frame in ("", b""):  # websocket-client's answer to a close frame
                if not self.stopping:
                    self._fire("disconnect", 0, 0, ConnectionResetError("closed by the server"))
                return
            size = len(frame.encode() if isinstance(frame, str) else frame)
            lat = latency_ms(frame)
            name = "snapshot" if first else "message"
            if lat is None:
                self._fire(name, 0, size, ValueError("frame without a numeric `ts`"))
            else:
                self._fire(name, lat, size, None)
            first = False

    @task
    def keep_connected(self) -> None:
        if self.reader is None or self.reader.dead:
            self._close()
            self._connect()

    def _close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):  # it is being thrown away anyway
                self.ws.close()
            self.ws = None

    def on_stop(self) -> None:
        self.stopping = True
        if self.reader is not None:
            self.reader.kill(block=False)
        self._close()
