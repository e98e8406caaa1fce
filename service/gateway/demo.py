"""`gateway demo`: NATS, a publisher and the gateway on one machine, no Docker.

Starts an embedded nats-server (JetStream in a temp dir, on a free loopback port so it
never clashes with a NATS already running), publishes synthetic signals at 4 Hz and
serves the gateway with the `GATEWAY_*` settings. Ctrl-C stops all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import msgspec
from opentelemetry.sdk.trace import TracerProvider

from gateway.natsserver import NatsServer
from gateway.publisher import publish
from gateway.server import Gateway, banner
from gateway.settings import Settings

DEMO_RATE_HZ = 4.0


def run(settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
    """Run the demo until Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp, NatsServer(Path(tmp)) as nats:
        settings = msgspec.structs.replace(settings, nats_servers=(nats.url,))
        print(banner(settings))
        print(
            f"  demo: nats-server {nats.url} (JetStream in {tmp}), publisher at {DEMO_RATE_HZ:g} Hz"
        )
        print(f"  watch: uv run python -m websockets ws://localhost:{settings.port}/ws/stream")
        print(f"  health: curl localhost:{settings.port}/health    Ctrl-C stops everything")
        print(f"  live view: http://localhost:{settings.port}/")
        asyncio.run(_serve(settings, tracer_provider))


async def _serve(settings: Settings, tracer_provider: TracerProvider | None) -> None:
    publisher = asyncio.create_task(
        publish(
            settings.nats_servers,
            stream=settings.stream,
            subject=settings.subject,
            rate_hz=DEMO_RATE_HZ,
        )
    )
    try:
        await Gateway(settings, tracer_provider=tracer_provider).serve()
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
