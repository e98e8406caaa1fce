"""The Litestar app: its routes, built by `create_app`.

`/ws/stream` (wsstream.py) and `/sse/stream` (sse.py) are the two transports of the
stream; `/health`, `/ready`, `/metrics` and the live view page are here. Routes close over
the hub, relay and settings they are given: nothing is global, so a test builds as many
apps as it likes.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata, resources
from typing import Any, Protocol

import msgspec
from litestar import Litestar, MediaType, Response, WebSocket, asgi, get, websocket
from litestar.plugins import PluginProtocol
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import sse, wsstream
from gateway.hub import SocketBroadcaster
from gateway.metrics import Metrics
from gateway.settings import Settings

SERVICE = "gateway"
VERSION = metadata.version("gateway")


class RelayView(Protocol):
    """What the app reads of the relay (the composition root passes the relay in)."""

    @property
    def ready(self) -> bool: ...
    @property
    def nats_connected(self) -> bool: ...
    @property
    def shared(self) -> bool: ...

    subscribed: bool
    consumer: str | None
    consumer_lag: int | None
    replica: str


class Health(msgspec.Struct, frozen=True):
    """The `/health` body (SPEC: HTTP)."""

    service: str
    version: str
    status: str
    replica: str
    consumer: str | None
    nats_url: str
    connections: int
    nats_connected: bool
    last_message_ts: float | None
    consumer_lag: int | None


def create_app(
    *,
    settings: Settings,
    hub: SocketBroadcaster,
    relay: RelayView,
    metrics: Metrics,
    plugins: Sequence[PluginProtocol] = (),
    tracer: trace.Tracer | None = None,
) -> Litestar:
    """Build the app serving `hub` and reporting on `relay`."""

    serve_websocket = wsstream.websocket_stream(settings, hub, metrics, tracer)

    @websocket("/ws/stream")
    async def stream(socket: WebSocket[Any, Any, Any]) -> None:
        await serve_websocket(socket)

    page = (resources.files("gateway") / "live.html").read_text(encoding="utf-8")

    @get("/", media_type=MediaType.HTML, sync_to_thread=False, include_in_schema=False)
    def live_view() -> Response[str]:
        # no-cache: after an upgrade, browsers revalidate and get the new page
        return Response(page, media_type=MediaType.HTML, headers={"Cache-Control": "no-cache"})

    @get("/health", media_type=MediaType.JSON, sync_to_thread=False)
    def health() -> Health:
        # Degraded: no current data (NATS away, not subscribed), or only part of it (our
        # consumer is shared with another process, which takes some of the messages).
        ok = relay.ready and not relay.shared
        latest = hub.latest
        return Health(
            service=SERVICE,
            version=VERSION,
            status="healthy" if ok else "degraded",
            replica=relay.replica,
            consumer=relay.consumer if relay.subscribed else None,
            nats_url=settings.nats_url_redacted,
            connections=metrics.service_connections(local=len(hub.active_connections)),
            nats_connected=relay.nats_connected,
            last_message_ts=latest.published_at if latest else None,
            consumer_lag=relay.consumer_lag,
        )

    @get("/ready", sync_to_thread=False)
    def ready() -> Response[dict[str, bool]]:
        ok = relay.ready and not hub.closing
        body = {"ready": ok, "nats_connected": relay.nats_connected, "subscribed": relay.subscribed}
        return Response(body, status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get("/metrics", sync_to_thread=False)
    def metrics_endpoint() -> Response[bytes]:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    serve_events = sse.event_stream(settings, hub, metrics)

    @asgi("/sse/stream", copy_scope=False)
    async def event_stream(scope: Any, receive: Any, send: Any) -> None:
        await serve_events(scope, receive, send)

    handlers = [stream, event_stream, health, ready, metrics_endpoint]
    if settings.live_view:
        handlers.append(live_view)
    return Litestar(
        route_handlers=handlers,
        plugins=list(plugins),
        openapi_config=None,
        logging_config=None,  # the CLI configures logging once, for every library
    )
