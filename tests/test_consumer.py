"""Consumer identity: each process claims its own consumer through a lease, and notices
when another process pulls from it anyway (consumer.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import httpx
import msgspec
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gateway.consumer import BUCKET, consumer_names
from gateway.natsserver import NatsServer
from gateway.sharing import ShareDetector

from conftest import (
    GatewayProcess,
    jetstream,
    make_settings,
    publish_json,
    running_gateway,
    wait_until,
)

STREAM = "LEVEL_SIGNALS"


# --- ShareDetector: gaps in the consumer's delivery sequence ---------------------------


def feed(detector: ShareDetector, seqs: list[int], start: float = 100.0, step: float = 0.25):
    """Observe `seqs` at `step`-second intervals; return every change reported."""
    changes = []
    for i, seq in enumerate(seqs):
        change = detector.observe(seq, start + i * step)
        if change is not None:
            changes.append((seq, change))
    return changes


def test_consecutive_deliveries_are_not_sharing() -> None:
    """A process that alone pulls sees consumer sequences 1, 2, 3, ...: never flagged."""
    detector = ShareDetector()
    assert feed(detector, list(range(1, 200))) == []
    assert not detector.shared


def test_repeated_gaps_flag_sharing_once() -> None:
    """Every other delivery missing (another puller): flagged at the third gap, once."""
    detector = ShareDetector()
    assert feed(detector, list(range(1, 40, 2))) == [(7, True)]
    assert detector.shared


def test_a_single_lost_delivery_is_not_sharing() -> None:
    """One or two gaps (deliveries lost in a reconnect) are not enough."""
    detector = ShareDetector()
    assert feed(detector, [1, 2, 4, 5, 6, 8, 9, *range(10, 100)]) == []


def test_gaps_in_the_grace_after_a_reconnect_do_not_count() -> None:
    """Right after a reconnect, redeliveries and lost deliveries leave gaps: ignored."""
    detector = ShareDetector()
    detector.reset(100.0, reconnected=True)
    assert feed(detector, [1, 3, 5, 7, 9], start=100.0, step=0.5) == []
    assert feed(detector, [11, 13, 15], start=100.0 + ShareDetector.GRACE_S) == [(15, True)]


def test_sharing_clears_after_a_quiet_minute() -> None:
    """Once the other puller is gone, a minute without gaps ends the alarm."""
    detector = ShareDetector()
    feed(detector, [1, 3, 5, 7])
    assert detector.shared
    later = 101.0 + ShareDetector.CLEAR_S
    assert detector.observe(8, later - 1) is None
    assert detector.observe(9, later + 1) is False
    assert not detector.shared


def test_consumer_names_start_with_the_base_name() -> None:
    """The first replica gets the seed's durable name; the next ones are numbered."""
    assert consumer_names("gateway_levels")[:3] == [
        "gateway_levels",
        "gateway_levels_2",
        "gateway_levels_3",
    ]


# --- leases against a real nats-server --------------------------------------------------

pytestmark_anyio = pytest.mark.anyio


async def consumers(url: str) -> dict[str, ConsumerConfig]:
    async with jetstream(url) as js:
        try:
            infos = await js.consumers_info(STREAM)
        except nats.js.errors.NotFoundError:
            return {}
        return {info.name: info.config for info in infos}


@pytestmark_anyio
async def test_a_restarted_gateway_resumes_the_durable_gateway_levels(
    nats_server: NatsServer,
) -> None:
    """One gateway, stopped and started again, binds `gateway_levels` both times."""
    for _ in range(2):
        async with running_gateway(make_settings(nats_server.url)) as gw:
            await wait_until(lambda gw=gw: gw.relay.ready, what="the relay to subscribe")
            assert gw.relay.consumer == "gateway_levels"
    assert set(await consumers(nats_server.url)) == {"gateway_levels"}
    async with jetstream(nats_server.url) as js:
        kv = await js.key_value(BUCKET)
        with pytest.raises(nats.js.errors.NotFoundError):
            await kv.get(f"{STREAM}.gateway_levels")  # released at shutdown


@pytestmark_anyio
async def test_durables_carry_an_inactive_threshold_and_gone_ones_are_deleted(
    nats_server: NatsServer,
) -> None:
    """Every durable is created (or updated) with the threshold; the server reaps it."""
    async with jetstream(nats_server.url) as js:
        await js.add_stream(name=STREAM, subjects=["levels.signals"])
        # A durable from an older gateway, without a threshold: it gets one on bind.
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name="gateway_levels",
                filter_subject="levels.signals",
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=1024,
            ),
        )
    settings = make_settings(nats_server.url, consumer_inactive_s=1.5)
    async with running_gateway(settings) as gw:
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        config = (await consumers(nats_server.url))["gateway_levels"]
        assert config.inactive_threshold == pytest.approx(1.5)
    # Nobody pulls any more: the server deletes the durable after the threshold.
    await wait_until(
        lambda: _no_consumers(nats_server.url), timeout=15, what="the durable to be deleted"
    )


async def _no_consumers(url: str) -> bool:
    return not await consumers(url)


@pytestmark_anyio
async def test_a_stolen_lease_moves_the_relay_to_another_name(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """When another process holds our name now, the relay stops pulling it and moves on."""
    settings = make_settings(nats_server.url, lease_ttl_s=2.0)
    async with running_gateway(settings) as gw, jetstream(nats_server.url) as js:
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        assert gw.relay.consumer == "gateway_levels"
        kv = await js.key_value(BUCKET)
        thief = msgspec.json.encode({"replica": "elsewhere", "process": "0", "since": 0.0})

        async def held_by_thief() -> bool:
            # The thief is a live holder: it writes its lease (again) while we wait.
            await kv.put(f"{STREAM}.gateway_levels", thief)
            return gw.relay.ready and gw.relay.consumer == "gateway_levels_2"

        await wait_until(held_by_thief, what="the relay to move to gateway_levels_2")
        seq = await publish_json(js, {"n": 1})
        await wait_until(
            lambda: gw.hub.latest is not None and gw.hub.latest.seq == seq,
            what="messages to flow on the new consumer",
        )
    assert any("lease on consumer 'gateway_levels' was taken" in r.message for r in caplog.records)


async def _health(port: int) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        doc = (await http.get(f"http://127.0.0.1:{port}/health")).json()
    assert isinstance(doc, dict)
    return doc


@pytestmark_anyio
async def test_a_killed_replica_restarted_with_its_id_resumes_its_own_durable(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """kill -9 then restart with the same GATEWAY_REPLICA_ID: its lease and durable are its
    own again at once; another replica meanwhile gets the next name."""
    env = {"NATS_URL": nats_server.url, "GATEWAY_LEASE_TTL_S": "60"}

    async def consumer_of(proc: GatewayProcess) -> object:
        port = proc.wait_started()
        with contextlib.suppress(httpx.HTTPError):
            doc = await _health(port)
            return doc["consumer"] if doc["status"] == "healthy" else None
        return None

    first = gateway_process({**env, "GATEWAY_REPLICA_ID": "gw-0"})
    await wait_until(lambda: consumer_of(first), timeout=20, what="gw-0 to subscribe")
    assert await consumer_of(first) == "gateway_levels"
    first.proc.kill()  # SIGKILL: no release, the lease stays for its TTL (60 s)
    first.wait_exit()

    other = gateway_process({**env, "GATEWAY_REPLICA_ID": "gw-1"})
    await wait_until(lambda: consumer_of(other), timeout=20, what="gw-1 to subscribe")
    assert await consumer_of(other) == "gateway_levels_2", "gw-0's name is still leased"

    again = gateway_process({**env, "GATEWAY_REPLICA_ID": "gw-0"})
    await wait_until(lambda: consumer_of(again), timeout=20, what="gw-0 to subscribe again")
    assert await consumer_of(again) == "gateway_levels"
    assert "took over the lease on gateway_levels" in again.output
    assert set(await consumers(nats_server.url)) == {"gateway_levels", "gateway_levels_2"}
