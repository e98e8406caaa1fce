"""The relay: everything NATS. JetStream `levels.signals` in, validated frames to the hub.

One background task owns the NATS side. It connects (retrying forever, so the gateway
starts without NATS), makes sure the stream exists, binds the consumer, primes the hub's
cache with the newest message on the subject, then pulls one message at a time. What
becomes of each message (skipped when behind, below the sequence floor, invalid, or
relayed) is ingest.py's; the floor resets here, when the stream itself was reset.

Consumer identity: every process pulls from a consumer of its own, so every replica relays
every message. A durable's name is claimed through a lease (see consumer.py), and a
consumer shared with another process anyway is noticed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime

import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from opentelemetry import trace

from gateway.consumer import ConsumerLease, LeaseLost, NoFreeName, bind
from gateway.ingest import FrameSink, Ingest
from gateway.metrics import Metrics
from gateway.natslink import NatsLink
from gateway.settings import Settings
from gateway.sharing import ShareDetector
from gateway.streams import ensure_stream

log = logging.getLogger(__name__)

# One message per pull request. A batched fetch in nats-py waits after its first message
# for an end-of-batch status, which never comes when the message answered a request the
# fetch did not send (one orphaned by a late 408, nats-io/nats.py #986): it held messages
# up to a second (tests/test_pull.py). A single-message fetch returns whatever reaches
# the inbox at once. The cost: a backlog drains at one round trip per message.
FETCH_BATCH = 1
FETCH_TIMEOUT_S = 1.0  # bounds how stale the loop can be; a lost pull request costs this much
LAG_REFRESH_S = 1.5  # consumer info (lag, and "does my consumer still exist?") this often
RETRY_S = 1.0  # pause before rebinding after the stream or consumer went away
# JetStream API requests (consumer info, create, lease updates) give up after this: while
# a cluster elects new leaders a shorter wait retries sooner (nats-py's default is 5 s).
JS_API_TIMEOUT_S = 2.0
RELEASE_TIMEOUT_S = 1.0
CANCEL_RETRY_S = 0.5


class Relay:
    """Consumes the subject from JetStream and feeds the hub; reports its own state."""

    def __init__(
        self,
        settings: Settings,
        hub: FrameSink,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ingest = Ingest(settings, hub, metrics, tracer)
        """The per-message path, and the sequence floor."""
        self.subscribed = False
        """True while the consumer is bound and known to exist."""
        self.consumer_lag: int | None = None
        """The consumer's num_pending from the last consumer info, None when unknown."""
        self.consumer: str | None = None
        """The name of the consumer in use (the server's name for an ephemeral one)."""
        self.replica = settings.replica_id or f"{socket.gethostname()}:{settings.port}"
        """Who this process is, in leases and logs: `GATEWAY_REPLICA_ID`, else host:port
        (unique among live processes: a second one could not listen on the same port)."""
        self.sharing = ShareDetector()
        """Watches for another process pulling from our consumer."""
        self._lease = (
            ConsumerLease(
                stream=settings.stream,
                base=settings.durable,
                replica=self.replica,
                ttl_s=settings.lease_ttl_s,
                replicas=settings.stream_replicas,
                trusted=bool(settings.replica_id) or settings.port != 0,
            )
            if settings.durable and settings.consumer_lease
            else None
        )
        self._link = NatsLink(
            settings, metrics, lambda: self.sharing.reset(time.monotonic(), reconnected=True)
        )
        self._stream_created: datetime | None = None
        self._closing = False

    @property
    def nats_connected(self) -> bool:
        return self._link.connected

    @property
    def ready(self) -> bool:
        """Connected and subscribed: the gateway can serve current data."""
        return self.nats_connected and self.subscribed

    @property
    def shared(self) -> bool:
        """Another process is seen pulling from our consumer."""
        return self.sharing.shared

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        """Run the relay in the background; on exit stop pulling and drain NATS."""
        task = asyncio.create_task(self._run(), name="nats-relay")
        try:
            yield self
        finally:
            self._closing = self._link.closing = True
            # Cancel until it is done: a cancellation that lands while a library's
            # `wait_for` is completing can be swallowed (CPython gh-86296; seen here under
            # load in nats-py's fetch), and the loop would pull forever.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_RETRY_S)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._close()

    async def _run(self) -> None:
        nc = await self._link.connect()
        js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
        while not self._closing:  # the one error boundary of this task
            try:
                await self._consume(js)
            except (LeaseLost, NoFreeName) as exc:
                log.warning("%s; claiming a consumer name again", exc)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("JetStream consumer lost (%s: %s); rebinding", type(exc).__name__, exc)
            except Exception:
                log.exception("unexpected error in the relay; rebinding")
            await asyncio.sleep(RETRY_S)

    async def _consume(self, js: JetStreamContext) -> None:
        await self._ensure_stream(js)
        psub, self.consumer = await bind(js, self.settings, self._lease)
        self.ingest.group = self.consumer if self.settings.durable else None
        renewal = None if self._lease is None else asyncio.create_task(self._lease.keep())
        try:
            await self._prime(js)
            self.subscribed = True
            self.sharing.reset(time.monotonic())
            log.info(
                "consuming %s from stream %s with %s consumer %r (replica %s)",
                self.settings.subject,
                self.settings.stream,
                "durable" if self.settings.durable else "ephemeral",
                self.consumer,
                self.replica,
            )
            next_info = 0.0
            while not self._closing:
                if time.monotonic() >= next_info:
                    await self._refresh_lag(psub)
                    next_info = time.monotonic() + LAG_REFRESH_S
                if renewal is not None and renewal.done():
                    renewal.result()  # LeaseLost: stop pulling this consumer, claim again
                try:
                    msgs = await psub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except TimeoutError:  # nats-py also raises the builtin one from inside
                    continue  # no messages, or NATS is away: nats-py reconnects underneath
                for msg in msgs:
                    self._watch_sharing(msg.metadata.sequence.consumer)
                    await self.ingest.handle(msg)
        finally:
            self.subscribed = False
            if renewal is not None:
                renewal.cancel()
                await asyncio.wait({renewal})
                if not renewal.cancelled():
                    renewal.exception()  # retrieved: raised above already, or moot now
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        replicas = self.settings.stream_replicas
        if await ensure_stream(js, self.settings.stream, self.settings.subject, replicas):
            log.info("created stream %s for %s", self.settings.stream, self.settings.subject)
        # A stream that was deleted and recreated (or lost with a server's data) numbers
        # its messages from 1 again: then the floor from the old stream must go. Its
        # creation time tells; a last sequence below the floor too, if that is unknown.
        info = await js.stream_info(self.settings.stream)
        if self._lease is not None:  # the leases are as available as the stream they name
            self._lease.replicas = info.config.num_replicas or 1
        recreated = self._stream_created is not None and info.created != self._stream_created
        if recreated or info.state.last_seq < self.ingest.floor:
            log.warning("stream %s was reset; following its new sequence", self.settings.stream)
            self.ingest.floor = 0
        self._stream_created = info.created

    async def _prime(self, js: JetStreamContext) -> None:
        """Offer the newest message on the subject, so new clients get state at once."""
        try:
            raw = await js.get_last_msg(self.settings.stream, self.settings.subject)
        except nats.js.errors.NotFoundError:
            return  # nothing published yet
        if raw.seq is not None and raw.data is not None and raw.time is not None:
            self.ingest.offer(raw.seq, raw.data, raw.time.timestamp())

    async def _refresh_lag(self, psub: JetStreamContext.PullSubscription) -> None:
        try:
            info = await psub.consumer_info()
        except TimeoutError:
            self.consumer_lag = None  # NATS is away; any other error (consumer gone) rebinds
            return
        self.consumer_lag = info.num_pending
        if info.num_pending is not None:
            self.metrics.consumer_lag.set(info.num_pending)

    def _watch_sharing(self, delivery_seq: int) -> None:
        change = self.sharing.observe(delivery_seq, time.monotonic())
        if change is True:
            self.metrics.consumer_shared.set(1)
            log.warning(
                "another process is pulling from consumer %r: this replica misses the "
                "messages delivered to it; give every replica its own consumer "
                "(GATEWAY_CONSUMER_LEASE=1, or a distinct GATEWAY_DURABLE)",
                self.consumer,
            )
        elif change is False:
            self.metrics.consumer_shared.set(0)
            log.info("consumer %r: no sign of another process any more", self.consumer)

    async def _close(self) -> None:
        if self._lease is not None and self._link.connected:
            with contextlib.suppress(TimeoutError, nats.errors.Error):  # the TTL frees it anyway
                await asyncio.wait_for(self._lease.release(), RELEASE_TIMEOUT_S)
        await self._link.close()
