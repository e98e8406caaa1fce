"""The NATS connection: made forever, its state said once per change, drained at the end.

The gateway starts and serves without NATS: `connect` retries until a server of
`NATS_URL` answers, and nats-py reconnects to any of them for as long as the process
lives. Each change is one log line and the `gateway_nats_connected` gauge; the URLs shown
never carry a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS

from gateway.metrics import Metrics
from gateway.settings import Settings, redact_url

log = logging.getLogger("gateway.relay")  # the relay's voice: operators grep one logger

DRAIN_TIMEOUT_S = 3.0


class NatsLink:
    """One NATS connection and what the operator is told about it."""

    def __init__(
        self, settings: Settings, metrics: Metrics, on_reconnected: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_reconnected = on_reconnected
        self.nc: NATS | None = None
        self.closing = False
        """Set at shutdown: a disconnect then is expected, not news."""
        self._said_unreachable = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> NATS:
        """Connect (retrying forever); return the client."""
        self.nc = nc = NATS()
        await nc.connect(
            servers=list(self.settings.nats_servers),
            name="gateway",
            max_reconnect_attempts=-1,  # never give up: the gateway outlives NATS outages
            reconnect_time_wait=1,
            connect_timeout=2,
            ping_interval=10,  # a dead server is noticed in ~30 s, not the default 4 min
            max_outstanding_pings=3,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_error,
        )
        log.info("connected to NATS at %s", self.shown())
        self.metrics.nats_connected.set(1)
        return nc

    async def close(self) -> None:
        """Drain (bounded), then close; idempotent."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("NATS drain incomplete: %s", exc)
        with contextlib.suppress(nats.errors.Error, OSError):  # NATS may be gone already
            await nc.close()
        self.metrics.nats_connected.set(0)

    def shown(self) -> str:
        """The server we are connected to (else the configured list), redacted."""
        url = self.nc.connected_url if self.nc else None
        return self.settings.nats_url_redacted if url is None else redact_url(url.geturl())

    async def _on_disconnected(self) -> None:
        self.metrics.nats_connected.set(0)
        self._said_unreachable = True
        if not self.closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_connected.set(1)
        self.on_reconnected()
        log.info("reconnected to NATS at %s", self.shown())

    async def _on_error(self, exc: Exception) -> None:
        # While NATS is away nats-py reports every failed attempt: say it once, at start,
        # (later outages are announced by the disconnected callback), the rest is debug.
        if self.nc is not None and not self.nc.is_connected and not self._said_unreachable:
            self._said_unreachable = True
            log.warning("NATS not reachable at %s (%s); retrying", self.shown(), exc)
        log.debug("NATS error: %s: %s", type(exc).__name__, exc)
