"""The hub: direct writes, one-slot mailboxes, writers on demand, conflation, timeouts, drain.

The sockets are a fake we own (`FakeSink`); the hub, its metrics and the event loop are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from gateway.client import Client
from gateway.hub import WS_1001_GOING_AWAY, SocketBroadcaster
from gateway.metrics import Metrics
from gateway.payload import Frame

from conftest import seconds, wait_until

pytestmark = pytest.mark.anyio

LONG = 30.0  # a send timeout no test should reach unless it means to


class FakeSink:
    """A socket that records what it is sent and can stall or fail on demand."""

    def __init__(
        self,
        *,
        stall_sends: bool = False,
        stall_close: bool = False,
        fail: BaseException | None = None,
    ) -> None:
        self.frames: list[str] = []
        """Texts whose send completed."""
        self.attempts: list[str] = []
        """Texts whose send started (completed or not)."""
        self.closes: list[tuple[int, float]] = []
        """(code, loop time) of every close frame sent."""
        self.release = asyncio.Event()
        """While clear, sends stall; set it to let them through."""
        if not stall_sends:
            self.release.set()
        self.stall_close = stall_close
        self.fail = fail
        self.aborted = False
        self.gone = asyncio.Event()
        """Set when the peer leaves (it answered our close frame, or the test says so)."""

    async def send(self, frame: Frame) -> None:
        text = frame.text
        self.attempts.append(text)
        if self.fail is not None:
            raise self.fail
        await self.release.wait()
        self.frames.append(text)

    def write_now(self, frame: Frame) -> bool:
        """Like a server without direct writes: always use the ASGI send path."""
        return False

    def abort(self) -> None:
        """The server drops the connection: the peer is gone at once."""
        self.aborted = True
        self.gone.set()

    async def close(self, code: int) -> None:
        self.closes.append((code, asyncio.get_running_loop().time()))
        if self.stall_close:
            await asyncio.Event().wait()  # never set: the peer stopped reading
        self.gone.set()


class Harness:
    """A hub on a fresh registry, with clients served the way the app's handler does."""

    def __init__(self, send_timeout_s: float, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.hub = SocketBroadcaster(Metrics(self.registry, process=False), send_timeout_s, clock)
        self.handlers: dict[Client, asyncio.Task[None]] = {}

    async def attach(self, sink: FakeSink) -> Client:
        """Connect `sink` from a handler task that waits until the peer leaves or is dropped."""
        connected: asyncio.Future[Client] = asyncio.get_running_loop().create_future()

        async def handler() -> None:
            client = self.hub.connect(sink)
            connected.set_result(client)
            try:
                await sink.gone.wait()  # the app reads until the peer leaves (or is aborted)
            finally:
                self.hub.disconnect(client)

        task = asyncio.create_task(handler())
        client = await connected
        self.handlers[client] = task
        return client

    def sample(self, name: str) -> float:
        value = self.registry.get_sample_value(name)
        return 0.0 if value is None else value

    async def ended(self, client: Client, timeout: float = 5.0) -> None:
        """Wait until the connection of `client` ended (its handler returned)."""
        await asyncio.wait_for(asyncio.shield(self.handlers[client]), seconds(timeout))


@contextlib.asynccontextmanager
async def hub_under_test(
    send_timeout_s: float = LONG, clock: Callable[[], float] = lambda: 0.0
) -> AsyncIterator[Harness]:
    harness = Harness(send_timeout_s, clock)
    try:
        yield harness
    finally:
        for task in harness.handlers.values():
            task.cancel()
        await asyncio.gather(*harness.handlers.values(), return_exceptions=True)


def frame(n: int, published_at: float = 0.0) -> Frame:
    return Frame(f'{{"n":{n}}}', n, published_at)


async def test_new_client_gets_cached_frame_first() -> None:
    """A client connecting after broadcasts gets the newest cached frame first, then later ones."""
    async with hub_under_test() as h:
        h.hub.broadcast(frame(1))
        h.hub.broadcast(frame(2))
        sink = FakeSink()
        await h.attach(sink)
        await wait_until(lambda: sink.frames == [frame(2).text], what="the cached frame")
        h.hub.broadcast(frame(3))
        await wait_until(lambda: len(sink.frames) == 2, what="the next frame")
        assert sink.frames == [frame(2).text, frame(3).text]
        assert h.hub.latest_payload == frame(3).text


async def test_client_that_keeps_up_gets_every_frame_in_order() -> None:
    """A client whose sends complete receives every broadcast frame, in order, counted as sent."""
    async with hub_under_test() as h:
        sink = FakeSink()
        await h.attach(sink)
        for n in range(10):
            h.hub.broadcast(frame(n))
            await wait_until(lambda n=n: len(sink.frames) == n + 1, what=f"frame {n}")
        assert sink.frames == [frame(n).text for n in range(10)]
        assert h.sample("gateway_messages_sent_total") == 10
        assert h.sample("gateway_messages_conflated_total") == 0


async def test_every_client_is_handed_the_same_text_object() -> None:
    """The frame's text is sent as is to every client: decoded once, never copied per client."""
    async with hub_under_test() as h:
        sinks = [FakeSink() for _ in range(3)]
        for sink in sinks:
            await h.attach(sink)
        sent = frame(1)
        h.hub.broadcast(sent)
        await wait_until(lambda: all(s.frames for s in sinks), what="every client")
        assert all(s.frames[0] is sent.text for s in sinks)


async def test_broadcast_is_synchronous_and_not_delayed_by_a_blocked_client() -> None:
    """Broadcast is a plain call; a client stuck in a send never delays it or the others."""
    assert not inspect.iscoroutinefunction(SocketBroadcaster.broadcast)
    async with hub_under_test() as h:
        blocked, healthy = FakeSink(stall_sends=True), FakeSink()
        await h.attach(blocked)
        await h.attach(healthy)
        for n in range(20):
            assert not inspect.isawaitable(h.hub.broadcast(frame(n))), "nothing to await"
            await wait_until(lambda n=n: len(healthy.frames) == n + 1, what=f"frame {n}")
        assert healthy.frames == [frame(n).text for n in range(20)]
        assert blocked.attempts == [frame(0).text], "still stuck in its first send"
        assert h.sample("gateway_broadcast_duration_seconds_count") == 20


async def test_slow_client_gets_newest_frame_only() -> None:
    """A client busy sending skips to the newest frame; the skipped ones are counted."""
    async with hub_under_test() as h:
        slow, fast = FakeSink(stall_sends=True), FakeSink()
        await h.attach(slow)
        await h.attach(fast)
        h.hub.broadcast(frame(1))
        await wait_until(lambda: slow.attempts == [frame(1).text], what="the slow send to start")
        for n in (2, 3, 4):
            h.hub.broadcast(frame(n))
            await wait_until(lambda n=n: fast.frames[-1:] == [frame(n).text], what=f"fast {n}")
        # The slow mailbox took 2, then 3 replaced 2 and 4 replaced 3.
        assert h.sample("gateway_messages_conflated_total") == 2
        slow.release.set()
        await wait_until(lambda: len(slow.frames) == 2, what="the slow client to catch up")
        assert slow.frames == [frame(1).text, frame(4).text]
        assert fast.frames == [frame(n).text for n in (1, 2, 3, 4)], "the fast one skipped none"
        assert h.sample("gateway_messages_sent_total") == 6


async def test_stalled_send_is_dropped_after_send_timeout() -> None:
    """A send that stalls past the send timeout ends that client's writer and counts a failure."""
    timeout = 0.2
    async with hub_under_test(send_timeout_s=timeout) as h:
        stalled, healthy = FakeSink(stall_sends=True), FakeSink()
        stalled_client = await h.attach(stalled)
        await h.attach(healthy)
        loop = asyncio.get_running_loop()
        started = loop.time()
        h.hub.broadcast(frame(1))
        await h.ended(stalled_client)
        elapsed = loop.time() - started
        assert elapsed >= timeout * 0.9, "not dropped before the timeout"
        assert elapsed < seconds(timeout + 2.0), "dropped soon after it"
        assert h.sample("gateway_send_failures_total") == 1
        assert stalled.aborted, "its connection aborted, the handler ended by that signal"
        assert not healthy.aborted
        assert stalled_client.reason == "send_timeout"
        assert stalled_client not in h.hub.active_connections
        assert h.sample("gateway_connections_active") == 1
        h.hub.broadcast(frame(2))
        await wait_until(lambda: len(healthy.frames) == 2, what="the healthy client")
        assert stalled.frames == []


async def test_connection_reset_ends_only_that_client() -> None:
    """A sink raising ConnectionResetError ends its writer, counts a failure, spares the rest."""
    async with hub_under_test() as h:
        gone, healthy = FakeSink(fail=ConnectionResetError()), FakeSink()
        gone_client = await h.attach(gone)
        await h.attach(healthy)
        h.hub.broadcast(frame(1))
        await h.ended(gone_client)
        assert h.sample("gateway_send_failures_total") == 1
        assert gone_client not in h.hub.active_connections
        h.hub.broadcast(frame(2))
        await wait_until(lambda: len(healthy.frames) == 2, what="the healthy client")
        assert h.sample("gateway_messages_sent_total") == 2


class BrokenWriteSink(FakeSink):
    """A socket whose direct write raises something nobody expected."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def write_now(self, frame: Frame) -> bool:
        raise self.error


@pytest.mark.parametrize(
    "make_sink",
    [
        pytest.param(lambda: FakeSink(fail=ValueError("bad state")), id="send-raises-ValueError"),
        pytest.param(lambda: FakeSink(fail=KeyError("x")), id="send-raises-KeyError"),
        pytest.param(lambda: BrokenWriteSink(TypeError("no")), id="write-raises-TypeError"),
        pytest.param(lambda: BrokenWriteSink(AttributeError("gone")), id="write-raises-AttrError"),
    ],
)
async def test_any_error_from_one_client_drops_only_that_client(
    make_sink: Callable[[], FakeSink],
) -> None:
    """Whatever one socket raises, that client alone is dropped; broadcast goes on."""
    async with hub_under_test() as h:
        before, broken, after = FakeSink(), make_sink(), FakeSink()
        await h.attach(before)
        broken_client = await h.attach(broken)
        await h.attach(after)
        for n in (1, 2, 3):
            h.hub.broadcast(frame(n))  # must not raise: the relay would take it for NATS
        await h.ended(broken_client)
        await wait_until(
            lambda: before.frames == after.frames == [frame(n).text for n in (1, 2, 3)],
            what="the healthy clients to get every frame",
        )
        assert broken_client.dropped
        assert h.sample("gateway_send_failures_total") == 1


async def test_peer_that_leaves_is_forgotten_without_close_frame() -> None:
    """A client whose peer left (mid-send, even) is removed; no close frame is sent to it."""
    async with hub_under_test() as h:
        sink = FakeSink(stall_sends=True)
        client = await h.attach(sink)
        h.hub.broadcast(frame(1))  # a send in flight, handed to a writer
        sink.gone.set()
        await h.ended(client)
        assert sink.closes == []
        assert h.hub.active_connections == set()
        assert client.writer is None, "its writer was stopped"


async def test_sent_frame_observes_delivery_lag_from_publish_time() -> None:
    """Delivery lag is the injected clock at send minus the frame's publish time."""
    async with hub_under_test(clock=lambda: 1000.5) as h:
        sink = FakeSink()
        await h.attach(sink)
        h.hub.broadcast(frame(1, published_at=1000.0))
        await wait_until(lambda: sink.frames != [], what="the frame")
        await wait_until(
            lambda: h.sample("gateway_delivery_lag_seconds_count") == 1, what="the observation"
        )
        assert h.sample("gateway_delivery_lag_seconds_sum") == pytest.approx(0.5)


async def test_disconnect_is_idempotent() -> None:
    """Disconnecting a client twice is harmless and leaves the gauge at the true count."""
    async with hub_under_test() as h:
        first = h.hub.connect(FakeSink())
        h.hub.connect(FakeSink())
        assert h.sample("gateway_connections_active") == 2
        h.hub.disconnect(first)
        h.hub.disconnect(first)
        assert len(h.hub.active_connections) == 1
        assert h.sample("gateway_connections_active") == 1
        assert h.sample("gateway_connections_total") == 2


async def test_close_sends_going_away_to_every_client_and_refuses_afterwards() -> None:
    """close() sends 1001 once to each client, waits for all to go, and marks the hub closing."""
    async with hub_under_test() as h:
        sinks = [FakeSink() for _ in range(5)]
        for sink in sinks:
            await h.attach(sink)
        assert h.hub.closing is False
        await asyncio.wait_for(h.hub.close(code=WS_1001_GOING_AWAY, spread_s=0.0), seconds(5))
        assert [[code for code, _ in s.closes] for s in sinks] == [[1001]] * 5
        assert h.hub.active_connections == set()
        assert h.sample("gateway_connections_active") == 0
        assert h.hub.closing is True
        assert all(task.done() for task in h.handlers.values())


async def test_close_without_clients_returns_at_once_and_marks_closing() -> None:
    """With nobody connected, close() returns immediately and the hub is closing."""
    async with hub_under_test() as h:
        await asyncio.wait_for(h.hub.close(spread_s=10.0), seconds(1))
        assert h.hub.closing is True


@pytest.mark.parametrize("spread", [0.5, 1.0])
async def test_close_spreads_closes_over_drain_time(spread: float) -> None:
    """With spread_s, the first and last 1001 are about spread_s apart; with 0, all at once."""
    async with hub_under_test() as h:
        spread_sinks = [FakeSink() for _ in range(20)]
        for sink in spread_sinks:
            await h.attach(sink)
        await asyncio.wait_for(h.hub.close(spread_s=spread), seconds(spread * 4 + 5))
    spread_times = sorted(t for s in spread_sinks for _, t in s.closes)

    async with hub_under_test() as h:
        burst_sinks = [FakeSink() for _ in range(20)]
        for sink in burst_sinks:
            await h.attach(sink)
        await asyncio.wait_for(h.hub.close(spread_s=0.0), seconds(5))
    burst_times = sorted(t for s in burst_sinks for _, t in s.closes)

    assert len(spread_times) == len(burst_times) == 20
    span = spread_times[-1] - spread_times[0]
    assert spread * 0.5 <= span <= seconds(spread * 3), f"closes spanned {span:.3f}s"
    assert burst_times[-1] - burst_times[0] < spread * 0.25, "no spread: all at once"
    distinct_moments = len({round(t - spread_times[0], 2) for t in spread_times})
    assert distinct_moments >= 5, "closed in several batches, not one burst"


@pytest.mark.parametrize(
    "stall",
    [{"stall_close": True}, {"stall_sends": True}],
    ids=["close frame stalls", "send stalls"],
)
async def test_close_returns_even_if_a_client_blocks(stall: dict[str, bool]) -> None:
    """A client that never takes its close (or frame) delays close() one send timeout at most."""
    timeout = 0.2
    async with hub_under_test(send_timeout_s=timeout) as h:
        stuck = FakeSink(**stall)
        await h.attach(stuck)
        others = [FakeSink() for _ in range(3)]
        for sink in others:
            await h.attach(sink)
        h.hub.broadcast(frame(1))
        await wait_until(lambda: stuck.attempts != [], what="the stuck client to start sending")
        await wait_until(lambda: all(s.frames for s in others), what="the others")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(h.hub.close(spread_s=0.0), seconds(timeout + 5))
        elapsed = loop.time() - started
        assert elapsed < seconds(timeout + 1.0), f"close() took {elapsed:.2f}s"
        assert h.hub.active_connections == set()
        assert all([code for code, _ in s.closes] == [1001] for s in others)
        if stall.get("stall_close"):
            assert [code for code, _ in stuck.closes] == [1001], "its close was attempted"


async def test_idle_client_is_written_inside_broadcast_without_a_task_switch() -> None:
    """A client with nothing in flight gets the frame written during broadcast() itself."""
    async with hub_under_test() as h:
        sink = FakeSink()
        await h.attach(sink)
        h.hub.broadcast(frame(1))
        assert sink.frames == ['{"n":1}'], "written before broadcast() returned"
        assert h.sample("gateway_messages_sent_total") == 1
        assert h.sample("gateway_delivery_lag_seconds_count") == 1


async def test_send_that_would_block_is_finished_by_the_writer() -> None:
    """A send that cannot complete at once is handed, unfinished, to the client's writer."""
    async with hub_under_test() as h:
        sink = FakeSink(stall_sends=True)
        await h.attach(sink)
        h.hub.broadcast(frame(1))
        assert sink.attempts == ['{"n":1}']
        assert sink.frames == []
        h.hub.broadcast(frame(2))  # busy: goes to the mailbox
        sink.release.set()
        await wait_until(lambda: sink.frames == ['{"n":1}', '{"n":2}'], what="both frames")
        assert sink.attempts == ['{"n":1}', '{"n":2}'], "the first send was not restarted"
        assert h.sample("gateway_messages_sent_total") == 2
        assert h.sample("gateway_messages_conflated_total") == 0


async def test_handed_over_send_that_stalls_is_dropped_after_the_timeout() -> None:
    """A handed-over send still stalled after the send timeout drops the client."""
    async with hub_under_test(send_timeout_s=0.2) as h:
        sink = FakeSink(stall_sends=True)
        client = await h.attach(sink)
        h.hub.broadcast(frame(1))
        await h.ended(client)
        assert h.sample("gateway_send_failures_total") == 1
        assert client not in h.hub.active_connections


class DirectSink(FakeSink):
    """A sink whose server takes prebuilt frames directly (as DirectWriteProtocol does)."""

    def __init__(self) -> None:
        super().__init__()
        self.wire: list[bytes] = []

    def write_now(self, frame: Frame) -> bool:
        self.wire.append(frame.websocket())
        return True


async def test_frame_is_built_once_and_written_directly_to_every_idle_client() -> None:
    """Idle clients get the same prebuilt frame bytes object; no ASGI send is started."""
    async with hub_under_test() as h:
        sinks = [DirectSink() for _ in range(3)]
        for sink in sinks:
            await h.attach(sink)
        h.hub.broadcast(frame(7))
        wires = [sink.wire for sink in sinks]
        assert all(len(w) == 1 for w in wires)
        assert wires[0][0] is wires[1][0] is wires[2][0], "one bytes object for everyone"
        assert wires[0][0] == b"\x81\x07" + b'{"n":7}'
        assert all(sink.attempts == [] for sink in sinks)
        assert h.sample("gateway_messages_sent_total") == 3
        assert h.sample("gateway_delivery_lag_seconds_count") == 3


async def test_a_client_that_keeps_up_never_gets_a_writer_task() -> None:
    """Writers exist only while a send is stuck: a healthy connection costs one task."""
    async with hub_under_test() as h:
        sink = FakeSink()
        client = await h.attach(sink)
        tasks_before = len(asyncio.all_tasks())
        for n in range(5):
            h.hub.broadcast(frame(n))
            assert client.writer is None
        assert len(asyncio.all_tasks()) == tasks_before
        assert len(sink.frames) == 5
