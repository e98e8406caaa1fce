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
    env = {"NATS_URL": nats_server.url, "GATEWAY_WORKERS": "2", "GATEWAY_MAX_CONNECTIONS": "100"}
    proc = gateway_process(env)
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
    assert metric(text, "gateway_connections_max") == 100, "each worker's half of the cap, summed"
    os.kill(proc.proc.pid, signal.SIGTERM)
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), seconds(10))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
    assert await asyncio.to_thread(proc.wait_exit, 15) == 0, proc.output


def children(pid: int) -> set[int]:
    """PIDs of a process's direct children (from /proc)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.update(int(child) for child in f.read().split())
    return found


async def test_a_killed_worker_is_restarted_and_serves_again(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """kill -9 of one worker: the supervisor says so, starts a new one, and both serve."""
    proc = gateway_process({"NATS_URL": nats_server.url, "GATEWAY_WORKERS": "2"})
    port = proc.wait_started()
    await wait_until(lambda: proc.output.count("consuming levels.signals") == 2, what="workers")
    workers = {pid for pid in children(proc.proc.pid) if "spawn_main" in _cmdline(pid)}
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: "died with exit code -9; restarting" in proc.output, what="the log")
    await wait_until(lambda: proc.output.count("consuming levels.signals") == 3, what="a new one")
    assert victim not in children(proc.proc.pid)
    url = f"ws://127.0.0.1:{port}/ws/stream"
    clients = [await websockets.connect(url) for _ in range(CLIENTS)]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def service_connections() -> bool:
                return (await http.get("/health")).json()["connections"] == CLIENTS

            await wait_until(service_connections, what="every client counted")
        async with jetstream(nats_server.url) as js:
            await publish_json(js, {"after": "restart"})
        for ws in clients:
            assert json.loads(await asyncio.wait_for(ws.recv(), seconds(5))) == {"after": "restart"}
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    os.kill(proc.proc.pid, signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait_exit, 15) == 0, proc.output
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""
