"""BASELINE ONLY, NOT THE GATEWAY: the naive relay, written exactly as the seed describes.

`loadtest/bench.py` runs this next to the real gateway and nats-server's own WebSocket
listener, so the gateway's costs are measured against what the seed document
(`seed/gateway-interfaces.md`) would have produced:

- a Litestar app with `/ws/stream` and `/health`;
- `SocketBroadcaster` with `active_connections: list`, `_latest_payload: dict`;
- a core NATS subscription on `levels.signals` whose callback `_on_level_signals`
  `json.loads` the message, caches it and calls `broadcast`;
- `broadcast` serializes once (`json.dumps`) and then does
  `for ws in active_connections: await ws.send_text(msg)` in turn, removing the ones
  that fail. A client whose socket buffer is full blocks that `await`, and with it
  everyone after it in the list (the point of the comparison);
- a new client is sent the cached payload at once.

Served by uvicorn with the gateway's WebSocket settings (websockets-sansio,
per-message-deflate off, 20 s pings) and, by default, the same event loop as the gateway
(`NAIVE_LOOP=asyncio`; `uvloop` to compare).

Run: `NATS_URL=nats://127.0.0.1:4222 PORT=8001 uv run python loadtest/naive_relay.py`
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import uvicorn
from litestar import Litestar, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from nats.aio.msg import Msg

NATS_URL = os.environ.get("NATS_URL", "nats://localhost:4222")
SUBJECT = "levels.signals"


class SocketBroadcaster:
    """The seed's class, method for method."""

    def __init__(self) -> None:
        self.active_connections: list[WebSocket[Any, Any, Any]] = []
        self._latest_payload: dict[str, Any] | None = None
        self.nc: nats.NATS | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(NATS_URL, name="naive-relay")
        await self.nc.subscribe(SUBJECT, cb=self._on_level_signals)

    async def connect(self, websocket: WebSocket[Any, Any, Any]) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)
        if self._latest_payload is not None:
            await websocket.send_text(json.dumps(self._latest_payload))

    async def disconnect(self, websocket: WebSocket[Any, Any, Any]) -> None:
        if websocket in self.active_connections:
            self.active_connections.remove(websocket)

    async def broadcast(self, message: dict[str, Any]) -> None:
        msg = json.dumps(message)  # serialize once
        failed = []
        for ws in self.active_connections:
            try:
                await ws.send_text(msg)
            except Exception:  # the seed: log, remove the failed connection, carry on
                failed.append(ws)
        for ws in failed:
            await self.disconnect(ws)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def _on_level_signals(self, msg: Msg) -> None:
        data = json.loads(msg.data)
        self._latest_payload = data
        await self.broadcast(data)


broadcaster = SocketBroadcaster()


@websocket("/ws/stream")
async def stream(socket: WebSocket[Any, Any, Any]) -> None:
    await broadcaster.connect(socket)
    try:
        while True:
            await socket.receive_data(mode="text")
    except WebSocketDisconnect:
        pass
    finally:
        await broadcaster.disconnect(socket)


@get("/health", sync_to_thread=False)
def health() -> dict[str, Any]:
    return {
        "service": "gateway-naive-baseline",
        "status": "healthy",
        "nats_url": NATS_URL,
        "connections": len(broadcaster.active_connections),
    }


@asynccontextmanager
async def lifespan(_: Litestar) -> AsyncIterator[None]:
    await broadcaster.start()  # NATS unreachable: the seed's service crashes at start
    try:
        yield
    finally:
        await broadcaster.close()


app = Litestar(route_handlers=[stream, health], lifespan=[lifespan], openapi_config=None)


def main() -> None:
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8001")),
        loop=os.environ.get("NAIVE_LOOP", "asyncio"),  # the gateway runs on asyncio's loop
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
