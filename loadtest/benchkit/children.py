"""Child processes we start (and stop, by PID only), and the HTTP checks that wait for them."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchkit.procs import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str, limit_s: float = 2.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit_s)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), limit_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


CHILDREN: list[Any] = []  # every server process we started (has .stop()), for the safety net


@atexit.register
def _stop_leftovers() -> None:
    """Stop (by PID) any child still running when we exit, e.g. after Ctrl-C."""
    for child in CHILDREN:
        with contextlib.suppress(OSError, RuntimeError):
            getattr(child, "stop_now", child.stop)()  # the publisher's `stop` is async


class Child:
    """A child process we started; stopped by its PID only."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C in the terminal is ours to handle
            )
        CHILDREN.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def wait_http(child: Child, port: int, path: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await http_get(port, path)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} not ready on {path} after {limit_s}s:\n{child.tail()}"
            )
        await asyncio.sleep(0.1)


READY_TIMEOUT_S = 20.0  # a gateway child prints its port within this


class GatewayChild:
    """`python -m gateway` on a free loopback port; its port is read back from its log."""

    _LISTENING = re.compile(r"Uvicorn running on http://[^:]+:(\d+)")

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env={**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._started = threading.Event()
        threading.Thread(target=self._read, name="gateway-log", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if (match := self._LISTENING.search(line)) is not None:
                self.port = int(match.group(1))
                self._started.set()

    def wait_started(self) -> int:
        if not self._started.wait(READY_TIMEOUT_S) or self.port is None:
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.lines[-20:]))
        return self.port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def stop(self) -> None:
        """Kill it if it is still running (the normal end is a SIGTERM, in `main`)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
