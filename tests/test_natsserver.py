"""The nats-server child that `gateway demo` and the tests run: stopped cleanly, log complete."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from gateway.natsserver import NatsServer


class _SlowLog(deque[str]):
    """A log whose reader dawdles over the server's last line, until `go` is set."""

    def __init__(self, go: threading.Event) -> None:
        super().__init__(maxlen=500)
        self.go = go

    def append(self, line: str) -> None:
        super().append(line)
        if "Server Exiting" in line:
            self.go.wait(5)


def test_stop_lets_the_log_reader_finish_and_close_its_own_pipe(tmp_path: Path) -> None:
    """stop() once closed the stderr pipe under its reader thread ("I/O operation on closed
    file" in CI) when the reader was still busy with the last lines. A reader held on the
    last line makes that window wide: the pipe must outlive it, and the log be complete."""
    errors: list[threading.ExceptHookArgs] = []
    previous, threading.excepthook = threading.excepthook, errors.append
    go = threading.Event()
    server = NatsServer(tmp_path / "nats")
    server.log = _SlowLog(go)
    try:
        server.start()
        reader = server._reader
        assert reader is not None
        threading.Timer(0.3, go.set).start()  # widens the race window; nothing waits on it
        server.stop()
        reader.join(5)
        assert not reader.is_alive()
    finally:
        go.set()
        threading.excepthook = previous
    assert errors == []
    assert any("Server Exiting" in line for line in server.log)
