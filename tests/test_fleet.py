"""The fleet: replicas started with one environment each relay every message, behind HAProxy.

Real processes only: nats-server (one, or the 3-node cluster), `python -m gateway`
replicas with identical environments (as compose `--scale` or a Deployment starts them;
only the port differs), and haproxy running deploy/haproxy/haproxy.cfg with its DNS
discovery swapped for the loopback ports (tests/fleet.py). Clients reconnect with the
README's backoff. The numbers measured are printed (`pytest -s`) and named in failures.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import nats.errors
import pytest
import websockets
from nats.js import JetStreamContext

from fleet import (
    HAPROXY,
    Follower,
    deliver_final,
    following,
    gap_report,
    health,
    is_ready,
    publishing,
    running_fleet,
    watching_consumers,
)
from gateway.natsserver import NatsServer
from natscluster import STREAM, Node, cluster_client, jetstream_answers, stream_created

from conftest import GatewayProcess, jetstream, publish_json, recv_json, seconds, wait_until

pytestmark = pytest.mark.anyio
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)"
)

REPLICAS = 3
CLIENTS = 60
DRAIN_S = 2.0  # GATEWAY_DRAIN_S, left at its default in every replica
# A client of a draining replica is closed within the drain window, then waits at most a
# backoff draw (0.5 s on a first retry) and a handshake; 3 s on top is generous for that.
GAP_BOUND_S = DRAIN_S + seconds(3.0)
INACTIVE_S = 2.0  # GATEWAY_CONSUMER_INACTIVE_S in the kill -9 test
# kill -9 → the newest payload on every client of the dead replica: "a few seconds".
RECONNECT_BOUND_S = seconds(5.0)
# The stream's leader node lost under the fleet: clients stay connected, but no frame comes
# until the stream has a new leader (publishing pauses: 4-7 s measured here) and the
# gateways' consumers have theirs (2-9 s in test_cluster.py); a client moved by a restart
# in that window adds the restart's own bound.
NODE_LOSS_GAP_S = 9.0 + GAP_BOUND_S


def stats(values: list[float]) -> str:
    return f"worst {max(values):.2f}s, median {statistics.median(values):.2f}s"


async def next_n(ws: websockets.ClientConnection) -> int | None:
    """The next frame's n, or None if none comes in time."""
    try:
        n = (await recv_json(ws, timeout=5))["n"]
    except TimeoutError:
        return None
    assert isinstance(n, int)
    return n


async def test_identical_replicas_each_relay_every_payload(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """Three replicas started at once with one environment each relay every payload, in order."""
    env = {"NATS_URL": nats_server.url}
    procs = [gateway_process(env) for _ in range(REPLICAS)]
    ports = [await asyncio.to_thread(proc.wait_started, 20) for proc in procs]
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
        for port in ports:
            await wait_until(lambda port=port: is_ready(http, port), 30, f"{port} /ready")
        consumers = [(await health(http, port)).get("consumer") for port in ports]
    assert len(set(consumers)) == REPLICAS, f"one consumer per replica, got {consumers}"
    clients = [
        await websockets.connect(f"ws://127.0.0.1:{port}/ws/stream", proxy=None) for port in ports
    ]
    received: list[list[int | None]] = [[] for _ in clients]
    try:
        async with jetstream(nats_server.url) as js:
            for n in range(20):
                await publish_json(js, {"n": n})
                # Paced by the clients: this test is about every replica, not about overload
                # (a relay far behind skips to the newest state by design).
                for got, ws in zip(received, clients, strict=True):
                    got.append(await next_n(ws))
                if any(None in got for got in received):
                    break  # a replica missed one: the split this test is about
    finally:
        for ws in clients:
            await ws.close()
    assert received == [list(range(20))] * REPLICAS, (
        f"each replica's client got {received} (consumers {consumers})"
    )


@needs_haproxy
async def test_rolling_restart_behind_haproxy(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Replicas SIGTERMed and restarted in turn: no client waits over drain + 3 s for a frame."""
    env = {"NATS_URL": nats_server.url}
    async with (
        jetstream(nats_server.url) as js,
        running_fleet(gateway_process, env, tmp_path) as fleet,
        watching_consumers(js) as watch,
        following(fleet.haproxy.url, CLIENTS) as followers,
    ):
        async with publishing(js) as publisher:
            await wait_until(lambda: all(f.frames for f in followers), 30, "every first frame")
            for i in range(REPLICAS):
                await fleet.restart(i)
        ended = time.monotonic()
        await deliver_final(js, publisher.last + 1, followers)
        consumers = await fleet.consumers()
        left = await watch.poll()
    worst, median = gap_report(followers, ended)
    reconnects = sum(f.connections for f in followers) - CLIENTS
    print(
        f"\nrolling restart: per-client longest gap worst {worst:.2f}s, median {median:.2f}s; "
        f"{reconnects} reconnects; consumers in use {consumers}, on the server {sorted(left or ())}"
        f" (most seen {watch.most})"
    )
    assert reconnects >= CLIENTS // 2, "the restarts moved clients"
    assert worst <= GAP_BOUND_S, f"a client waited {worst:.2f}s for a frame (median {median:.2f})"
    assert len(set(consumers)) == REPLICAS, f"one consumer per replica, got {consumers}"
    # A replica stopped with SIGTERM releases its consumer name and its successor takes it:
    # a rolling restart leaves no consumer behind (nothing waits for the 600 s threshold).
    assert left == set(consumers), f"consumers left on the server: {sorted(left or ())}"
    assert watch.most <= REPLICAS, f"{watch.most} consumers at once"


@needs_haproxy
async def test_killed_replica_clients_recover_and_its_consumer_goes(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """kill -9 a replica: its clients are current again within seconds; only its consumer goes."""
    env = {"NATS_URL": nats_server.url, "GATEWAY_CONSUMER_INACTIVE_S": f"{INACTIVE_S:g}"}
    async with (
        jetstream(nats_server.url) as js,
        running_fleet(gateway_process, env, tmp_path) as fleet,
        watching_consumers(js) as watch,
        following(fleet.haproxy.url, CLIENTS) as followers,
    ):
        async with publishing(js) as publisher:
            await wait_until(lambda: all(f.frames for f in followers), 30, "every first frame")
            consumers = await fleet.consumers()
            assert len(set(consumers)) == REPLICAS, f"one consumer per replica, got {consumers}"
            victim, survivors = consumers[0], consumers[1:]
            await wait_until(
                lambda: set(consumers) <= (watch.names or set()), what="all consumers listed"
            )
            its_clients = (await health(fleet.http, fleet.ports[0]))["connections"]
            assert isinstance(its_clients, int)
            assert its_clients > 0, "leastconn gave the victim clients"
            open_then = [f.connections for f in followers]
            newest_then = publisher.last
            killed_at = time.monotonic()
            fleet.procs[0].proc.send_signal(signal.SIGKILL)

            def cut(follower: Follower, conn: int) -> bool:
                return len(follower.closed_at) >= conn  # its connection `conn` ended

            def back(follower: Follower, conn: int) -> float | None:
                later = [f for f in follower.frames if f.connection > conn]
                return later[0].at if later else None

            def recovered() -> bool:
                hit = [(f, c) for f, c in zip(followers, open_then, strict=True) if cut(f, c)]
                return len(hit) >= its_clients and all(back(f, c) for f, c in hit)

            await wait_until(recovered, 20, f"the dead replica's {its_clients} clients back")
            hit = [(f, c) for f, c in zip(followers, open_then, strict=True) if cut(f, c)]
            assert len(hit) == its_clients, "only the dead replica's clients were cut"
            for follower, conn in hit:
                first = next(f for f in follower.frames if f.connection > conn)
                assert first.n >= newest_then, "the first frame after a reconnect is the newest"
            times = [(back(f, c) or 0) - killed_at for f, c in hit]

            await wait_until(
                lambda: victim not in (watch.names or {victim}),
                INACTIVE_S + 15,
                f"the server to delete the dead replica's consumer {victim}",
            )
            removed_after = time.monotonic() - killed_at
            assert set(survivors) <= watch.names, f"survivors' consumers kept: {watch.names}"
        await deliver_final(js, publisher.last + 1, followers)
    print(
        f"\nkill -9: {len(hit)} clients back on the newest payload after {stats(times)}; "
        f"consumer {victim} deleted {removed_after:.1f}s after the kill "
        f"(threshold {INACTIVE_S:g}s); most consumers at once {watch.most}"
    )
    assert max(times) <= RECONNECT_BOUND_S, f"reconnects took {stats(times)}"
    assert removed_after >= INACTIVE_S, "deleted no earlier than the threshold"
    # Live replicas plus the dead one within its threshold: never more.
    assert watch.most <= REPLICAS, f"{watch.most} consumers at once"


async def stream_leader(js: JetStreamContext, nodes: list[Node]) -> Node:
    async def leader() -> Node | None:
        try:
            info = await js.stream_info(STREAM)
        except (nats.errors.Error, TimeoutError):  # between leaders: ask again
            return None
        name = info.cluster.leader if info.cluster else None
        return next((node for node in nodes if node.name == name), None)

    await wait_until(leader, 15, "the stream's leader")
    found = await leader()
    assert found is not None
    return found


@needs_haproxy
async def test_rolling_restart_on_a_cluster_losing_a_node(
    nats_cluster: list[Node], gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """A rolling restart while the stream's leader node dies: every client ends up current."""
    async with cluster_client(nats_cluster) as js:
        await wait_until(lambda: jetstream_answers(js), 30, "a JetStream leader")
        await wait_until(lambda: stream_created(js), 30, "the R3 stream")
        env = {
            "NATS_URL": ",".join(node.url for node in nats_cluster),
            "GATEWAY_STREAM_REPLICAS": "3",  # the lease bucket survives a node, as the stream
        }
        async with (
            running_fleet(gateway_process, env, tmp_path) as fleet,
            watching_consumers(js) as watch,
            following(fleet.haproxy.url, CLIENTS) as followers,
        ):
            async with publishing(js) as publisher:
                await wait_until(lambda: all(f.frames for f in followers), 30, "first frames")
                await fleet.restart(0)
                lost = await stream_leader(js, nats_cluster)
                lost.server.stop(signal.SIGKILL)
                for i in range(1, REPLICAS):
                    await fleet.restart(i)
            ended = time.monotonic()
            await deliver_final(js, publisher.last + 1, followers)
            consumers = await fleet.consumers()
            left = await watch.poll()
    worst, median = gap_report(followers, ended)
    print(
        f"\ncluster rolling restart, {lost.name} killed: per-client longest gap worst "
        f"{worst:.2f}s, median {median:.2f}s; consumers in use {consumers}, on the server "
        f"{sorted(left or ())} (most seen {watch.most}); the publisher's longest pause "
        f"{publisher.longest_pause:.2f}s"
    )
    assert worst <= NODE_LOSS_GAP_S, f"a client waited {worst:.2f}s (median {median:.2f})"
    assert len(set(consumers)) == REPLICAS, f"one consumer per replica, got {consumers}"
    assert left is not None
    assert set(consumers) <= left
    # A lease release that fails while the lease bucket elects a leader leaves that name
    # leased for GATEWAY_LEASE_TTL_S: the successor takes another name and the old consumer
    # idles until GATEWAY_CONSUMER_INACTIVE_S. Never more than one per replica restarted.
    assert watch.most <= 2 * REPLICAS, f"{watch.most} consumers at once: {sorted(left)}"
