"""`/health`, `/ready` and `/metrics` on a real gateway, with and without NATS."""

from __future__ import annotations

from importlib import metadata

import httpx
import pytest
import websockets

from gateway.natsserver import NatsServer

from conftest import (
    CONTRACT_METRICS,
    HISTOGRAMS,
    http_url,
    jetstream,
    make_settings,
    publish_json,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_health_reports_every_field_with_credentials_redacted(
    nats_server: NatsServer,
) -> None:
    """/health has SPEC's fields and types; the password never appears, the username may."""
    url = f"nats://alice:s3cret-pw@127.0.0.1:{nats_server.port}"
    async with (
        running_gateway(make_settings(url, replica_id="gw-a")) as gw,
        jetstream(nats_server.url) as js,
        httpx.AsyncClient() as http,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await publish_json(js, {"x": 1})
        await wait_until(lambda: gw.hub.latest is not None, what="a cached payload")
        await wait_until(lambda: gw.relay.consumer_lag == 0, what="consumer lag")
        async with websockets.connect(http_url(gw, "/ws/stream").replace("http", "ws")):
            await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
            response = await http.get(http_url(gw, "/health"))
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "service": "gateway",
        "version": metadata.version("gateway"),
        "status": "healthy",
        "replica": "gw-a",
        "consumer": "gateway_levels",
        "nats_url": f"nats://alice:***@127.0.0.1:{nats_server.port}",
        "connections": 1,
        "nats_connected": True,
        "last_message_ts": body["last_message_ts"],
        "consumer_lag": 0,
    }
    assert isinstance(body["last_message_ts"], float)
    assert "s3cret" not in response.text


async def test_health_is_200_and_degraded_while_nats_is_down(nats_server: NatsServer) -> None:
    """Liveness never fails because of NATS: 200, status degraded, nulls where unknown."""
    nats_server.stop()
    async with running_gateway(make_settings(nats_server.url)) as gw, httpx.AsyncClient() as http:
        response = await http.get(http_url(gw, "/health"))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["nats_connected"] is False
    assert body["last_message_ts"] is None
    assert body["consumer_lag"] is None


async def test_ready_follows_nats_and_turns_503_on_shutdown(nats_server: NatsServer) -> None:
    """/ready: 503 without NATS, 200 once subscribed, 503 again when NATS goes or we drain."""
    port = nats_server.port
    nats_server.stop()
    settings = make_settings(nats_server.url, drain_s=3.0)
    async with running_gateway(settings) as gw, httpx.AsyncClient() as http:

        async def ready_status() -> int:
            return (await http.get(http_url(gw, "/ready"))).status_code

        assert await ready_status() == 503
        server = NatsServer(nats_server.store_dir, port=port).start()
        await wait_until(lambda: gw.relay.ready, timeout=20, what="the relay")
        assert await ready_status() == 200
        server.stop()
        await wait_until(lambda: not gw.relay.nats_connected, what="the disconnect")
        assert await ready_status() == 503
        server = NatsServer(nats_server.store_dir, port=port).start()
        try:
            await wait_until(lambda: gw.relay.ready, timeout=20, what="the reconnect")
            url = http_url(gw, "/ws/stream").replace("http", "ws")
            clients = [await websockets.connect(url) for _ in range(10)]
            await wait_until(lambda: len(gw.hub.active_connections) == 10, what="the clients")
            gw.request_exit()  # ten clients' closes spread over 3 s: time to ask /ready
            await wait_until(lambda: gw.hub.closing, what="the drain to start")
            assert await ready_status() == 503
            for ws in clients:
                await ws.close()
        finally:
            server.stop()


async def test_metrics_endpoint_serves_the_contract_names(nats_server: NatsServer) -> None:
    """/metrics is Prometheus text with every SPEC metric name."""
    names = {name + "_bucket" if name in HISTOGRAMS else name for name in CONTRACT_METRICS}
    names.add("process_resident_memory_bytes")
    async with (
        running_gateway(make_settings(nats_server.url)) as gw,
        httpx.AsyncClient() as http,
    ):
        response = await http.get(http_url(gw, "/metrics"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    exposed = {line.split("{")[0].split(" ")[0] for line in response.text.splitlines()}
    assert names <= exposed
