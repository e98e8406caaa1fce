"""Which JetStream consumer this process pulls from, and the evidence that nobody else does.

Replicas started from one environment (compose `--scale`, a Kubernetes Deployment) must
not share a durable: JetStream would split the messages between them. So each process
*claims* a consumer name through a lease in the KV bucket `gateway_leases`: the first live
replica gets `gateway_levels`, the next `gateway_levels_2`, and so on.

- A lease is the key `<stream>.<name>`; its value names the holder (`GATEWAY_REPLICA_ID`,
  the hostname by default, and a per-process nonce). It is created with compare-and-set,
  renewed every TTL/3 with compare-and-set, and deleted on a clean shutdown.
- A process that dies stops renewing; the bucket's TTL removes the key and the name is
  free again. Its consumer outlives it by `GATEWAY_CONSUMER_INACTIVE_S`, then the server
  deletes it, so consumers of gone replicas never pile up.
- A process killed and restarted within the TTL takes its previous incarnation's lease
  over and resumes its own durable, when it can tell that incarnation was itself: the same
  `GATEWAY_REPLICA_ID`, or else the same host and listening port (two live processes
  cannot listen on one port). With neither (port 0, no id) it takes the next free name.
- A renewal that fails its compare-and-set means somebody else holds the name now (our
  lease expired while NATS was away): the relay stops pulling and claims again.

`bind` makes the consumer itself (a leased durable name, a fixed one, or an ephemeral)
and binds a pull subscription to it. sharing.py catches what leases cannot: a consumer
forced on two processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from gateway.settings import Settings

log = logging.getLogger("gateway.relay")  # the relay's voice: operators grep one logger

BUCKET = "gateway_leases"
MAX_ACK_PENDING = 1024
EPHEMERAL_INACTIVE_S = 60.0  # an ephemeral consumer outlives NATS blips shorter than this
RETRY_S = 0.5  # a renewal that failed to reach NATS is tried again this soon
MAX_NAMES = 256  # replicas per durable base name; past it a claim fails (and is retried)


class LeaseLost(Exception):
    """Our lease was taken by another process (it expired while we could not renew it)."""


class NoFreeName(Exception):
    """Every consumer name of the base is held by a live replica."""


class Holder(msgspec.Struct, frozen=True):
    """A lease's value: who holds the name."""

    replica: str
    """`GATEWAY_REPLICA_ID` (host:port by default), plus `/w<n>` for a worker."""
    process: str
    """A nonce per process: tells a previous incarnation from ourselves."""
    since: float
    """When this process claimed it (epoch seconds), for people reading the bucket."""


def consumer_names(base: str) -> list[str]:
    """The names a replica may claim, in order of preference."""
    return [base] + [f"{base}_{n}" for n in range(2, MAX_NAMES + 1)]


class ConsumerLease:
    """A claim on one consumer name of `base`, held through a KV lease."""

    def __init__(
        self, *, stream: str, base: str, replica: str, ttl_s: float, replicas: int, trusted: bool
    ) -> None:
        self.stream = stream
        self.base = base
        self.ttl_s = ttl_s
        self.replicas = replicas
        """Copies of the bucket if we create it: as many as the stream has."""
        self.name: str | None = None
        """The name held (kept after a loss: the next claim tries it first)."""
        self._holder = msgspec.json.encode(
            Holder(replica=replica, process=os.urandom(8).hex(), since=time.time())
        )
        self._replica = replica
        self._kv: KeyValue | None = None
        self._revision = 0
        self._renew_at = 0.0
        # Only a fresh process with a trusted replica id takes over its old incarnation's lease.
        self._takeover = trusted

    def _key(self, name: str) -> str:
        return f"{self.stream}.{name}"

    async def acquire(self, js: JetStreamContext) -> str:
        """Claim the first free name (our previous one first); return it."""
        takeover, self._takeover = self._takeover, False
        if self.name is not None and self._revision:  # a rebind: keep the name if still ours
            try:
                kv = self._kv = await _bucket(js, self.ttl_s, self.replicas)
                self._revision = await kv.update(
                    self._key(self.name), self._holder, last=self._revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                self._revision = 0
            except (TimeoutError, nats.errors.Error) as exc:
                # The bucket is unreachable (its node is down), not taken: keep the name.
                log.debug("lease check failed, keeping %s: %s", self.name, exc)
                return self.name
            else:
                self._renew_at = time.monotonic() + self.ttl_s / 3
                return self.name
        kv = self._kv = await _bucket(js, self.ttl_s, self.replicas)
        candidates = consumer_names(self.base)
        if self.name is not None:
            candidates.remove(self.name)
            candidates.insert(0, self.name)
        for name in candidates:
            revision = await self._try_claim(kv, name, takeover=takeover)
            if revision:
                self.name, self._revision = name, revision
                self._renew_at = time.monotonic() + self.ttl_s / 3
                return name
        raise NoFreeName(f"all {MAX_NAMES} consumer names of {self.base!r} are leased")

    async def _try_claim(self, kv: KeyValue, name: str, *, takeover: bool) -> int:
        key = self._key(name)
        try:
            return await kv.create(key, self._holder)
        except nats.js.errors.KeyWrongLastSequenceError:
            if not takeover:
                return 0
        try:
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:
            return 0  # expired or released just now: the next claim will find it free
        try:
            holder = msgspec.json.decode(entry.value or b"", type=Holder)
        except msgspec.DecodeError:
            return 0
        if holder.replica != self._replica or entry.revision is None:
            return 0
        try:
            revision = await kv.update(key, self._holder, last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return 0
        log.info("took over the lease on %s from this replica's previous process", name)
        return revision

    async def keep(self) -> None:
        """Renew the lease every TTL/3 until cancelled; raise `LeaseLost` if it was taken.

        A task of its own, so a pull that waits for messages never delays a renewal. A
        renewal that cannot reach NATS is retried: the lease has the rest of its TTL to
        spare, and the relay keeps pulling meanwhile.
        """
        while True:
            await asyncio.sleep(max(0.0, self._renew_at - time.monotonic()))
            await self._renew()

    async def _renew(self) -> None:
        if self._kv is None or self.name is None:
            return
        try:
            self._revision = await self._kv.update(
                self._key(self.name), self._holder, last=self._revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            self._revision = 0
            raise LeaseLost(f"the lease on consumer {self.name!r} was taken") from None
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("lease renewal failed, retrying: %s: %s", type(exc).__name__, exc)
            self._renew_at = time.monotonic() + RETRY_S
            return
        self._renew_at = time.monotonic() + self.ttl_s / 3

    async def release(self) -> None:
        """Delete our lease (if still ours), so a restarted replica gets the name at once."""
        if self._kv is None or self.name is None or not self._revision:
            return
        try:
            await self._kv.delete(self._key(self.name), last=self._revision)
        except (TimeoutError, nats.errors.Error) as exc:  # not ours any more, or NATS gone
            log.debug("lease release failed: %s: %s", type(exc).__name__, exc)
        self._revision = 0


async def _bucket(js: JetStreamContext, ttl_s: float, replicas: int) -> KeyValue:
    """The lease bucket, created (TTL = the lease time) if missing."""
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=BUCKET,
        description="gateway consumer-name leases",
        history=1,
        ttl=ttl_s,
        storage=StorageType.MEMORY,  # leases are worth nothing after a NATS restart
        replicas=replicas,
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        return await js.key_value(BUCKET)  # another replica created it differently first


async def bind(
    js: JetStreamContext, settings: Settings, lease: ConsumerLease | None
) -> tuple[JetStreamContext.PullSubscription, str]:
    """Make our consumer and bind to it: a leased durable name, a fixed one, or an
    ephemeral. Returns the subscription and the consumer's name."""
    config = ConsumerConfig(
        # A new consumer starts at the newest message; the relay's floor skips it if primed.
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=MAX_ACK_PENDING,
        filter_subject=settings.subject,
    )
    if not settings.durable:
        config.inactive_threshold = EPHEMERAL_INACTIVE_S
        psub = await js.pull_subscribe(settings.subject, stream=settings.stream, config=config)
        return psub, (await psub.consumer_info()).name
    name = settings.durable if lease is None else await lease.acquire(js)
    config.durable_name = name
    # The server deletes a durable nobody pulls from for this long: consumers of replicas
    # that are gone do not pile up. Also applied to an existing durable.
    config.inactive_threshold = settings.consumer_inactive_s
    try:
        await js.add_consumer(settings.stream, config)
    except nats.js.errors.BadRequestError as exc:
        log.warning("consumer %r has another configuration; using it as is (%s)", name, exc)
    return await js.pull_subscribe_bind(consumer=name, stream=settings.stream), name
