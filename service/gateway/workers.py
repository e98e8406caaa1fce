"""Several gateway processes on one port (`GATEWAY_WORKERS`): a small supervisor.

One event loop is one core. With N workers the supervisor binds the listening socket once
and starts N processes that all accept on it (the kernel spreads connections among
them). Each worker is a whole gateway with its own NATS consumer (`<durable>_<n>`, or
ephemeral), so every worker relays every message to its own clients; nothing is shared
but the socket and the metrics directory (see metrics.py), which makes `/metrics` and
`/health` describe the whole service.

Shutdown: SIGTERM/SIGINT reaches the supervisor, which passes SIGTERM on; each worker
drains its own clients (1001, spread over GATEWAY_DRAIN_S) and exits; then so does the
supervisor, with 0 if every worker exited cleanly.
"""

from __future__ import annotations

import asyncio
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
from types import FrameType

import msgspec
from prometheus_client import multiprocess

from gateway import logs, tracing
from gateway.settings import Settings

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # a worker's whole drain fits well inside this
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def serve(settings: Settings) -> int:
    """Run `settings.workers` gateway processes on one socket until SIGTERM/SIGINT."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by every worker
    sock = _listen(settings.host, settings.port)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited loop
    workers = [
        context.Process(target=_worker, args=(settings, n, sock), name=f"gateway-worker-{n}")
        for n in range(settings.workers)
    ]

    def forward(sig: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        host, port = sock.getsockname()[:2]
        log.info("%d workers listening on http://%s:%d", len(workers), host, port)
        for worker in workers:
            worker.join()
            multiprocess.mark_process_dead(worker.pid, metrics_dir)  # type: ignore[no-untyped-call]
    finally:
        forward(signal.SIGTERM, None)
        for worker in workers:
            worker.join(STOP_TIMEOUT_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1


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
