"""GATEWAY_WORKERS: several processes on one port, each relaying everything, one view."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from gateway.natsserver import NatsServer

from conftest import GatewayProcess, jetstream, publish_json, seconds, wait_until

pytestmark = pytest.mark.anyio

CLIENTS = 8


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


async def test_two_workers_relay_everything_and_report_the_whole_service(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """Two workers: every client gets every frame; /health and /metrics count all of them."""
    proc = gateway_process({"NATS_URL": nats_server.url, "GATEWAY_WORKERS": "2"})
    port = proc.wait_started()
    await wait_until(lambda: proc.output.count("consuming levels.signals") == 2, what="workers")
    url = f"ws://127.0.0.1:{port}/ws/stream"
    clients = [await websockets.connect(url) for _ in range(CLIENTS)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

        async def service_connections() -> bool:
            return (await http.get("/health")).json()["connections"] == CLIENTS

        await wait_until(service_connections, what="/health to count every worker's clients")
        async with jetstream(nats_server.url) as js:
            await publish_json(js, {"to": "everyone"})
        for ws in clients:
            assert json.loads(await asyncio.wait_for(ws.recv(), seconds(5))) == {"to": "everyone"}
        pids = {(await http.get("/health")).json()["connections"] for _ in range(6)}
        assert pids == {CLIENTS}, "every worker answers for the whole service"
        text = (await http.get("/metrics")).text
    assert metric(text, "gateway_connections_active") == CLIENTS
    assert metric(text, "gateway_messages_sent_total") == CLIENTS
    assert metric(text, "gateway_messages_received_total") == 2, "one consumer per worker"
    os.kill(proc.proc.pid, signal.SIGTERM)
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), seconds(10))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
    assert await asyncio.to_thread(proc.wait_exit, 15) == 0, proc.output
