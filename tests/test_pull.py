"""The relay's pull loop on a NATS link with latency (a delaying TCP proxy in between).

Regression for a pull request orphaned by a late 408 (nats-io/nats.py #986). nats-py's
batched `fetch` asks the server to expire a pull request 100 µs before its own timer. On
a link slower than that, the 408 for an idle fetch arrives after the client gave up. If
a message arrives at the server just then, the next batched fetch takes the stale 408
for the answer to its no-wait probe and sends a second request that it then abandons
when the message arrives. The *following* message lands on that orphaned request, and
the fetch waiting for it holds it until an end-of-batch status that never comes: up to
the fetch deadline, a whole 4 Hz interval or more. On loopback the window is microseconds
wide and the race shows only under load; 30 ms of link latency opens it every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.natsserver import NatsServer

from conftest import jetstream, make_settings, publish_json, running_gateway, seconds, wait_until

pytestmark = pytest.mark.anyio

SERVER_TO_CLIENT_DELAY_S = 0.03  # a slow link (or a busy client): the 408 arrives late


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
    on_chunk: Callable[[bytes], None],
) -> None:
    """Forward bytes in order, each chunk `delay_s` after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # the latency itself
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            on_chunk(data)
            queue.put_nowait((time.monotonic() + delay_s, data))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        writer.close()


@contextlib.asynccontextmanager
async def delaying_proxy(
    target_port: int, on_request: Callable[[bytes], None]
) -> AsyncIterator[int]:
    """A TCP proxy on a free loopback port to 127.0.0.1:`target_port`; what the server
    sends is delayed, what the client sends is shown to `on_request` as it passes."""
    pipes: set[asyncio.Task[None]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        for pipe in (
            _pipe(client_r, server_w, 0.0, on_request),
            _pipe(server_r, client_w, SERVER_TO_CLIENT_DELAY_S, lambda _: None),
        ):
            task = asyncio.create_task(pipe)
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()


async def test_a_message_after_a_timed_out_pull_is_not_held(nats_server: NatsServer) -> None:
    """Messages arriving as an idle pull times out are relayed at once, not a fetch later."""
    pulls: asyncio.Queue[float] = asyncio.Queue()

    def on_request(data: bytes) -> None:
        if b"CONSUMER.MSG.NEXT" in data:  # a pull request passes the proxy
            pulls.put_nowait(time.monotonic())

    delays: list[float] = []
    async with delaying_proxy(nats_server.port, on_request) as proxy_port:
        settings = make_settings(f"nats://127.0.0.1:{proxy_port}")
        async with running_gateway(settings) as gw, jetstream(nats_server.url) as js:
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
            for round_ in range(3):
                # Wait for a pull sent when the previous one timed out (>= 0.9 s apart),
                # then publish at once, into the window of the late 408, and once more
                # a 4 Hz interval later: that second message is the one at risk.
                previous = await pulls.get()
                while (now := await pulls.get()) - previous < 0.9:
                    previous = now
                for k in range(2):
                    seq = await publish_json(js, {"round": round_, "k": k})
                    sent = time.monotonic()
                    await wait_until(
                        lambda seq=seq: gw.hub.latest is not None and gw.hub.latest.seq == seq,
                        timeout=5,
                        what=f"message {seq} to be relayed",
                    )
                    delays.append(time.monotonic() - sent)
                    if k == 0:
                        await asyncio.sleep(0.25)  # the publisher's cadence (the stimulus)
                while not pulls.empty():
                    pulls.get_nowait()
    # An order of magnitude apart: relayed at once costs the link delay (~30-60 ms); held
    # on an orphaned request, a message waits for the fetch deadline (~1 s).
    assert max(delays) < seconds(0.3), [f"{d * 1000:.0f} ms" for d in delays]
