"""The JetStream publisher, a child process driven by JSON lines on its stdin.

Run as `python -m benchkit.pubchild NATS_URL` (from loadtest/) by `Publisher`; each stdin
line `{"base", "count", "rate", "size", "shape"}` publishes seq base+1 .. base+count at
`rate` Hz and answers one JSON line. Imports nothing from the bench but the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.children import CHILDREN
from gateway.publisher import make_payload

SUBJECT = "levels.signals"
STREAM = "LEVEL_SIGNALS"
HERE = Path(__file__).resolve().parents[1]  # loadtest/, where `-m benchkit.pubchild` runs


class Publisher:
    """The JetStream publisher, a child process driven by JSON lines on its stdin."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        CHILDREN.append(self)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchkit.pubchild",
            self.nats_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=HERE,
            start_new_session=True,
        )
        await self._reply(30.0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def run(
        self, base: int, count: int, rate: float, size: int, shape: str = "pad"
    ) -> dict[str, Any]:
        """Publish seq base+1 .. base+count at `rate` Hz; return when done."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        cmd = {"base": base, "count": count, "rate": rate, "size": size, "shape": shape}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._reply(count / rate + 30.0)

    async def _reply(self, limit_s: float) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        if not line:
            raise RuntimeError("the publisher exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop_now(self) -> None:
        """The exit safety net's stop: SIGTERM by PID."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def publisher_main(nats_url: str) -> None:
    """Child side of `Publisher`: one JSON command per stdin line, one JSON reply each."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the bench went away
        await _publish_commands(nats_url)


async def _publish_commands(nats_url: str) -> None:
    import nats

    from gateway.streams import ensure_stream

    makers = {"pad": make_payload, "levels": realistic_payload}
    nc = await nats.connect(nats_url, name="bench-publisher", max_reconnect_attempts=3)
    js = nc.jetstream()
    await ensure_stream(js, STREAM, SUBJECT)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        base, count, interval = cmd["base"], cmd["count"], 1.0 / cmd["rate"]
        make = makers[cmd.get("shape", "pad")]
        sent = failed = 0
        late_max = 0.0
        t0 = next_at = time.monotonic()
        for seq in range(base + 1, base + count + 1):
            late_max = max(late_max, time.monotonic() - next_at)
            try:
                await js.publish(SUBJECT, make(seq, time.time(), cmd["size"]), timeout=5)
                sent += 1
            except Exception as exc:
                failed += 1
                print(f"publish {seq} failed: {exc!r}", file=sys.stderr)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        print(
            json.dumps(
                {
                    "sent": sent,
                    "failed": failed,
                    "seconds": time.monotonic() - t0,
                    "late_max_ms": late_max * 1000,
                }
            ),
            flush=True,
        )
    with contextlib.suppress(Exception):  # stdin closed: the bench is done (or gone)
        await asyncio.wait_for(nc.drain(), 3)


def realistic_payload(seq: int, now: float, size: int = 4096) -> bytes:
    """`make_payload`'s shape grown to ~`size` bytes with more levels, not with padding.

    `gateway publish --size` pads with "x", which deflate squeezes to almost nothing; a
    real levels document is varied numbers. Each level gets a price, kind, strength, open
    interest and gamma, drawn per message (seeded by `seq`), until the JSON reaches `size`.
    """
    import random

    import msgspec

    from gateway.publisher import LEVEL_KINDS, document, spot_price

    rng = random.Random(seq)
    spot = spot_price(now, rng)
    levels: list[dict[str, Any]] = []
    doc = document(seq, now, spot, levels)
    encode = msgspec.json.Encoder().encode
    while True:
        levels.append(
            {
                "price": round(spot + rng.uniform(-12, 12), 2),
                "kind": LEVEL_KINDS[rng.randrange(len(LEVEL_KINDS))],
                "strength": round(rng.random(), 3),
                "oi": rng.randrange(100, 250_000),
                "gamma": round(rng.uniform(-3e6, 3e6), 1),
            }
        )
        data = encode(doc)
        if len(data) >= size:
            return data


if __name__ == "__main__":
    asyncio.run(publisher_main(sys.argv[1]))
