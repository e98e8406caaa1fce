"""Several gateway processes on one port (`GATEWAY_WORKERS`): a small supervisor.

One event loop is one core. With N workers the supervisor binds the listening socket once
and starts N processes that all accept on it (the kernel spreads connections among
them). Each worker is a whole gateway with its own NATS consumer (a leased name of its
own, `<durable>_<n>` without leases, or ephemeral), so every worker relays every message
to its own clients; nothing is shared but the socket and the metrics directory (see
metrics.py), which makes `/metrics` and `/health` describe the whole service.

A worker that dies (a crash, the OOM killer) is started again in its slot, after a pause
that doubles with each death in a row (1 s up to 30 s) and resets once a worker has run
for a minute: the service heals itself instead of serving on at reduced capacity, and a
worker that cannot start does not spin.

Shutdown: SIGTERM/SIGINT reaches the supervisor, which passes SIGTERM on; each worker
drains its own clients (1001, spread over GATEWAY_DRAIN_S) and exits; then so does the
supervisor, with 0 if every worker exited cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from types import FrameType

import msgspec
from prometheus_client import multiprocess

from gateway import logs, tracing
from gateway.settings import Settings

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # a worker's whole drain fits well inside this
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker that ran this long resets the backoff
POLL_S = 0.2  # how often the supervisor looks at its workers


def serve(settings: Settings) -> int:
    """Run `settings.workers` gateway processes on one socket until SIGTERM/SIGINT."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    sock = _listen(settings.host, settings.port)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited loop
    stopping = threading.Event()

    def start(n: int) -> BaseProcess:
        worker = context.Process(
            target=_worker, args=(settings, n, sock), name=f"gateway-worker-{n}"
        )
        with _inherited_env("PROMETHEUS_MULTIPROC_DIR", metrics_dir):
            worker.start()
        return worker

    workers = [start(n) for n in range(settings.workers)]

    def forward(sig: int, frame: FrameType | None) -> None:
        stopping.set()
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    host, port = sock.getsockname()[:2]
    log.info("%d workers listening on http://%s:%d", len(workers), host, port)
    started = dict.fromkeys(range(len(workers)), time.monotonic())
    delay = RESTART_FIRST_S
    try:
        while not stopping.is_set():
            for n, worker in enumerate(workers):
                if worker.is_alive() or stopping.is_set():
                    continue
                multiprocess.mark_process_dead(worker.pid, metrics_dir)  # type: ignore[no-untyped-call]
                if time.monotonic() - started[n] >= HEALTHY_AFTER_S:
                    delay = RESTART_FIRST_S
                log.warning(
                    "worker %d (pid %s) died with exit code %s; restarting it in %.0fs",
                    n, worker.pid, worker.exitcode, delay,
                )  # fmt: skip
                if stopping.wait(delay):
                    break
                delay = min(delay * 2, RESTART_MAX_S)
                workers[n], started[n] = start(n), time.monotonic()
            stopping.wait(POLL_S)
    finally:
        forward(signal.SIGTERM, None)
        for worker in workers:
            worker.join(STOP_TIMEOUT_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1


@contextlib.contextmanager
def _inherited_env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for a child started inside, not for this process after.

    prometheus_client picks its multiprocess mode from the environment at import, so a
    worker must have the variable from its first instruction.
    """
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def _worker(settings: Settings, index: int, sock: socket.socket) -> None:
    """One worker: a whole gateway with its own consumer, serving on the shared socket."""
    from gateway.server import Gateway  # imported here: after the metrics dir is set

    _exit_with_parent()
    logs.configure(settings.log_format, access_log=settings.access_log)
    # Each worker has its own consumer: a leased name of its own, or `<durable>_<n>`.
    fixed_name = settings.durable and not settings.consumer_lease
    settings = msgspec.structs.replace(
        settings,
        durable=f"{settings.durable}_{index}" if fixed_name else settings.durable,
        # Workers share a port: the index tells them apart (the port was bound already).
        replica_id=f"{settings.replica_id or _host_port(sock)}/w{index}",
        # The cap is the service's: each worker takes its share (rounded up).
        max_connections=-(-settings.max_connections // settings.workers),
    )
    tracer_provider = tracing.provider_from_env(os.environ, default_service="gateway")
    asyncio.run(Gateway(settings, tracer_provider=tracer_provider).serve(sockets=[sock]))


def _host_port(sock: socket.socket) -> str:
    return f"{socket.gethostname()}:{sock.getsockname()[1]}"


def _exit_with_parent() -> None:
    """Ask Linux to send us SIGTERM if the supervisor dies, even by SIGKILL (best effort)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
