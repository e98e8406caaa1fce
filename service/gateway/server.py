"""The composition root: builds hub, relay and app, runs them under uvicorn, shuts down well.

Shutdown, in order (SIGTERM or SIGINT):
 1. `/ready` turns 503 and new WebSocket handshakes are refused (hub.closing).
 2. Every client gets close code 1001, spread over `GATEWAY_DRAIN_S` so they do not all
    reconnect to the other replicas in the same instant. This has to happen *before*
    uvicorn's own shutdown, which would close every socket at once with 1012.
 3. uvicorn stops listening and finishes; the lifespan ends.
 4. The relay stops pulling and drains its NATS connection.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn
from litestar import Litestar
from litestar.enums import ScopeType
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry

from gateway import logs, tracing
from gateway.app import create_app
from gateway.hub import SocketBroadcaster
from gateway.metrics import Metrics
from gateway.relay import Relay
from gateway.settings import Settings
from gateway.uvicorn_seam import GatewayServer, handshake_deadline, protocol_class

log = logging.getLogger(__name__)

BANNER_RULE = "=" * 60
# Bounds uvicorn's wait for handlers after our own drain; a handler only outlives the
# drain when its client stalls, and then the send timeout ends it.
GRACEFUL_EXTRA_S = 2.0


class Gateway:
    """One gateway process: metrics, hub, relay and the Litestar app, wired together."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.metrics.connections_max.set(settings.max_connections)
        self.hub = SocketBroadcaster(self.metrics, settings.send_timeout_s)
        tracer = tracer_provider.get_tracer("gateway") if tracer_provider else None
        self.relay = Relay(settings, self.hub, self.metrics, tracer)
        self.app: Litestar = create_app(
            settings=settings,
            hub=self.hub,
            relay=self.relay,
            metrics=self.metrics,
            plugins=_http_tracing(tracer_provider),
            tracer=tracer,
        )
        self.server = GatewayServer(self._uvicorn_config(), on_shutdown=self._say_goodbye)

    def _uvicorn_config(self) -> uvicorn.Config:
        s = self.settings
        return uvicorn.Config(
            self.app,
            host=s.host,
            port=s.port,
            http=handshake_deadline(s.handshake_timeout_s, self._handshake_timed_out),
            # websockets-sansio + frames built once for everyone (compressed once, if on)
            ws=protocol_class(compression=s.ws_compression),
            ws_max_size=s.max_inbound_bytes,  # a larger inbound frame closes with 1009
            ws_per_message_deflate=False,  # uvicorn's keeps a context per client; ours does not
            # Pings find half-open connections (a peer gone without a close frame).
            ws_ping_interval=s.ping_interval_s or None,
            ws_ping_timeout=s.ping_interval_s or None,
            timeout_graceful_shutdown=int(s.drain_s + s.send_timeout_s + GRACEFUL_EXTRA_S),
            lifespan="on",
            log_config=None,  # logging is configured once, by the CLI
            access_log=s.access_log,  # HTTP lines; WebSocket ones are filtered in logs.py
            server_header=False,
        )

    @property
    def port(self) -> int:
        """The bound port (useful with GATEWAY_PORT=0); valid once `started` is set."""
        sockets = self.server.servers[0].sockets if self.server.servers else ()
        return int(sockets[0].getsockname()[1]) if sockets else self.settings.port

    @property
    def started(self) -> bool:
        return self.server.started

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Run until told to exit (a signal, or `request_exit`)."""
        try:
            async with self.relay.running():
                await self.server.serve(sockets)
        finally:
            if self.tracer_provider is not None:
                tracing.shut_down(self.tracer_provider)  # flushes the spans still batched

    def request_exit(self) -> None:
        """Start the graceful shutdown, as SIGTERM would."""
        self.server.should_exit = True

    async def _say_goodbye(self) -> None:
        await self.hub.close(spread_s=self.settings.drain_s)

    def _handshake_timed_out(self) -> None:
        self.metrics.connections_rejected.labels("handshake_timeout").inc()


def _http_tracing(provider: TracerProvider | None) -> list[OpenTelemetryPlugin]:
    """Litestar's own OpenTelemetry plugin: one span per HTTP request.

    Not for WebSockets: its span would stay open for the socket's whole life (the app
    makes a short handshake span instead). No span per frame, none for the endpoints that
    scrapers and probes hit every few seconds, and no secret in a span's URL attributes.
    """
    if provider is None:
        return []
    config = OpenTelemetryConfig(
        tracer_provider=provider,
        scopes={ScopeType.HTTP},
        exclude_spans=["send", "receive"],
        exclude=["/metrics", "/health", "/ready", "/sse/stream"],  # no span per event stream
        server_request_hook_handler=_redact_span_urls,
    )
    return [OpenTelemetryPlugin(config)]


URL_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")


def _redact_span_urls(span: Span, scope: Any) -> None:
    """Rewrite the request span's URL attributes without a query-string token."""
    attributes = getattr(span, "attributes", None) or {}
    for key in URL_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str) and (clean := logs.redact(value)) != value:
            span.set_attribute(key, clean)


def banner(settings: Settings) -> str:
    """The seed's start banner; the NATS URL is redacted."""
    host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    return "\n".join(
        [
            BANNER_RULE,
            "GATEWAY SERVICE",
            BANNER_RULE,
            f"  NATS URL: {settings.nats_url_redacted}",
            f"  WebSocket: ws://{host}:{settings.port}/ws/stream",
            BANNER_RULE,
        ]
    )


async def run(settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    await Gateway(settings, tracer_provider=tracer_provider).serve()
