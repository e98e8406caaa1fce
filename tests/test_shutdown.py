"""Graceful shutdown of a real gateway process: SIGTERM → 1001 to every client, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from gateway.natsserver import NatsServer

from conftest import GatewayProcess, seconds, wait_until

pytestmark = pytest.mark.anyio


async def close_time_and_code(ws: websockets.ClientConnection) -> tuple[float, int | None]:
    """Read until the server closes; return when, and with which code."""
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as closed:
        return time.monotonic(), closed.rcvd.code if closed.rcvd else None


async def has_clients(port: int, n: int) -> bool:
    """The gateway counts `n` connected clients (from /health)."""
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/health")).json()["connections"] == n


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_1001_and_exits_0(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], sig: int
) -> None:
    """On SIGTERM/SIGINT every client gets close code 1001 and the process exits 0."""
    proc = gateway_process({"NATS_URL": nats_server.url, "GATEWAY_DRAIN_S": "0"})
    port = proc.wait_started()
    clients = [await websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") for _ in range(3)]
    await wait_until(lambda: has_clients(port, 3), what="the clients")
    os.kill(proc.proc.pid, sig)
    results = await asyncio.wait_for(
        asyncio.gather(*(close_time_and_code(ws) for ws in clients)), seconds(10)
    )
    assert [code for _, code in results] == [1001, 1001, 1001]
    assert await asyncio.to_thread(proc.wait_exit, 10) == 0, proc.output


async def test_drain_spreads_closes_over_the_window(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """With GATEWAY_DRAIN_S=2, 1001 closes are spread over the window, not sent at once."""
    proc = gateway_process({"NATS_URL": nats_server.url, "GATEWAY_DRAIN_S": "2"})
    port = proc.wait_started()
    clients = [await websockets.connect(f"ws://127.0.0.1:{port}/ws/stream") for _ in range(40)]
    await wait_until(lambda: has_clients(port, 40), what="the clients")
    started = time.monotonic()
    os.kill(proc.proc.pid, signal.SIGTERM)
    results = await asyncio.wait_for(
        asyncio.gather(*(close_time_and_code(ws) for ws in clients)), seconds(15)
    )
    times = sorted(t for t, _ in results)
    assert {code for _, code in results} == {1001}
    # Spread, not a burst: the last close comes at least half a window after the first.
    assert times[-1] - times[0] >= 1.0, f"closes spread over {times[-1] - times[0]:.2f}s"
    assert times[-1] - started < seconds(10)
    assert await asyncio.to_thread(proc.wait_exit, 10) == 0, proc.output
