"""The `gateway` command: serve (default), publish, demo.

Configuration comes from the environment (see settings.py). A bad value stops the start
with one line on stderr naming the variable, and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from gateway import logs, tracing
from gateway.settings import Settings, SettingsError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Relay NATS JetStream level signals to WebSocket clients."
    )
    commands = parser.add_subparsers(dest="command", metavar="{serve,publish,demo}")
    commands.add_parser("serve", help="relay NATS_URL to WebSocket clients (the default)")
    commands.add_parser("demo", help="embedded nats-server + publisher + gateway, no Docker")
    pub = commands.add_parser("publish", help="publish synthetic level signals to NATS_URL")
    pub.add_argument("--rate", type=float, default=4.0, help="messages per second (default 4)")
    pub.add_argument("--size", type=int, default=0, help="pad payloads to about this many bytes")
    pub.add_argument("--count", type=int, default=None, help="stop after this many messages")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ if env is None else env
    service = "gateway-publisher" if args.command == "publish" else "gateway"
    try:
        settings = Settings.from_env(env)
        tracer_provider = tracing.provider_from_env(env, default_service=service)
    except (SettingsError, tracing.TracingConfigError) as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_format, access_log=settings.access_log)
    if args.command == "demo":
        from gateway import demo

        with contextlib.suppress(KeyboardInterrupt):
            demo.run(settings, tracer_provider)
    elif args.command == "publish":
        from gateway.publisher import publish

        if args.rate <= 0:
            print("gateway: --rate must be positive", file=sys.stderr)
            return EXIT_CONFIG
        coro = publish(
            settings.nats_servers,
            stream=settings.stream,
            subject=settings.subject,
            rate_hz=args.rate,
            size=args.size,
            count=args.count,
            tracer_provider=tracer_provider,
            stream_replicas=settings.stream_replicas,
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_until_signalled(coro))
        if tracer_provider is not None:
            tracing.shut_down(tracer_provider)  # flushes the batched spans
    else:
        from gateway.server import banner, run

        print(banner(settings), flush=True)
        if settings.workers > 1:
            from gateway import workers

            if tracer_provider is not None:
                tracer_provider.shutdown()  # each worker builds its own
            return workers.serve(settings)
        asyncio.run(run(settings, tracer_provider))
    return 0


async def _until_signalled(coro: Coroutine[Any, Any, Any]) -> None:
    """Run `coro` until it ends, or until SIGTERM or SIGINT: then cancel it, so its own
    cleanup (draining NATS) runs and the caller flushes spans and exits 0, as a stopped
    container should (an unhandled SIGTERM was exit 143 with the last spans lost)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
