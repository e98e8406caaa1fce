"""Secrets never leave the process: client tokens and NATS passwords are redacted at the
source in every log line (text and JSON) and span (console and OTLP); per-connection log
lines only when asked for; the WebSocket handshake span ends at accept."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gateway import cli
from gateway.logs import redact
from gateway.natsserver import NatsServer
from gateway.tracing import TracingConfigError, provider_from_env

from conftest import GatewayProcess, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-Tok3n-value"
GUESS = "wrong-guess-4711"
NATS_PASSWORD = "nats-pw-9876"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('- "WebSocket /ws/stream?token=abc" 403', '- "WebSocket /ws/stream?token=***" 403'),
        ("/ws/stream?x=1&token=abc&y=2", "/ws/stream?x=1&token=***&y=2"),
        ("/ws/stream?TOKEN=abc", "/ws/stream?TOKEN=***"),
        ("/?access_token=abc", "/?access_token=***"),
        ("nats://alice:pw@nats:4222", "nats://alice:***@nats:4222"),
        ("nats://tok@nats:4222", "nats://***@nats:4222"),
        ("http://otel-collector:4318/v1/traces", "http://otel-collector:4318/v1/traces"),
        ("tokens are fine to mention", "tokens are fine to mention"),
    ],
)  # fmt: skip
def test_redact_hides_tokens_and_url_passwords(text: str, expected: str) -> None:
    """Query-string tokens and URL userinfo secrets become ***; the rest stays readable."""
    assert redact(text) == expected


async def _connect_with_tokens(port: int) -> None:
    """One client with the right token, one with a wrong guess (refused, 401)."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream?token={TOKEN}"):
        pass
    with pytest.raises(InvalidStatus):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream?token={GUESS}"):
            pass


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_access_lines_show_connections_without_their_tokens(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess], log_format: str
) -> None:
    """With GATEWAY_ACCESS_LOG=1 each connection is logged, its token (right or wrong) not."""
    nats_url = nats_server.url.replace("nats://", f"nats://gw:{NATS_PASSWORD}@")
    proc = gateway_process(
        {
            "NATS_URL": nats_url,
            "GATEWAY_AUTH_TOKEN": TOKEN,
            "GATEWAY_ACCESS_LOG": "1",
            "GATEWAY_LOG_FORMAT": log_format,
        }
    )
    port = proc.wait_started()
    await _connect_with_tokens(port)
    await wait_until(lambda: "token=***" in proc.output and " 401" in proc.output, what="lines")
    if log_format == "json":
        for line in proc.lines:
            if line.startswith("{"):
                json.loads(line)  # still one valid object per line
    assert "/ws/stream?token=***" in proc.output
    for secret in (TOKEN, GUESS, NATS_PASSWORD):
        assert secret not in proc.output


async def test_per_connection_lines_are_off_by_default(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """Without GATEWAY_ACCESS_LOG, thousands of clients do not mean thousands of lines."""
    proc = gateway_process({"NATS_URL": nats_server.url, "GATEWAY_AUTH_TOKEN": TOKEN})
    port = proc.wait_started()
    await _connect_with_tokens(port)
    async with httpx.AsyncClient() as http:
        await http.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
    os.kill(proc.proc.pid, signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait_exit, 10) == 0
    for fragment in ("WebSocket /ws/stream", "connection open", "connection closed", "GET /"):
        assert fragment not in proc.output
    assert "ERROR" not in proc.output, "a refused handshake is not an error"
    assert TOKEN not in proc.output


async def test_console_spans_carry_no_token_and_the_handshake_span_ends_at_accept(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """Console spans: the handshake span is exported while its client is still connected,
    and neither it nor an HTTP request span shows the token."""
    proc = gateway_process(
        {
            "NATS_URL": nats_server.url,
            "GATEWAY_AUTH_TOKEN": TOKEN,
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
    )
    port = proc.wait_started()
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/stream?token={TOKEN}"):
        # Still connected: a span that lasted the socket's life could not be out yet.
        await wait_until(lambda: '"name": "WS /ws/stream"' in proc.output, what="the span")
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
        await wait_until(lambda: '"name": "GET /"' in proc.output, what="the HTTP span")
    os.kill(proc.proc.pid, signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait_exit, 10) == 0
    assert '"gateway.handshake.result": "accepted"' in proc.output
    assert "token=***" in proc.output  # the HTTP span's URL, redacted
    assert TOKEN not in proc.output


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that keeps the raw protobuf bodies it is sent."""

    bodies: list[bytes]

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def otlp_collector() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Handler", (_Collector,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


async def test_otlp_spans_carry_no_token(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """What reaches an OTLP collector holds the handshake span, and never the token."""
    with otlp_collector() as (endpoint, bodies):
        proc = gateway_process(
            {
                "NATS_URL": nats_server.url,
                "GATEWAY_AUTH_TOKEN": TOKEN,
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
            }
        )
        port = proc.wait_started()
        await _connect_with_tokens(port)
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
        os.kill(proc.proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait_exit, 10) == 0
    sent = b"".join(bodies)
    assert b"WS /ws/stream" in sent
    assert b"token=***" in sent
    for secret in (TOKEN, GUESS):
        assert secret.encode() not in sent


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_otlp_grpc_is_refused_naming_the_variable(
    variable: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gateway ships OTLP/HTTP only: asking for gRPC stops the start with exit 2."""
    env = {"OTEL_TRACES_EXPORTER": "otlp", variable: "grpc"}
    with pytest.raises(TracingConfigError, match=variable):
        provider_from_env(env, default_service="gateway")
    assert cli.main(["serve"], env=env) == cli.EXIT_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert variable in line
    provider = provider_from_env(
        {"OTEL_TRACES_EXPORTER": "otlp", variable: "http/protobuf"}, default_service="gateway"
    )
    assert provider is not None
    provider.shutdown()
