"""Traces: the publisher's trace continues through the gateway's consumer and fan-out spans."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import logs
from gateway.natsserver import NatsServer
from gateway.publisher import publish
from gateway.tracing import TracingConfigError, provider_from_env

from conftest import (
    GatewayProcess,
    jetstream,
    make_settings,
    running_gateway,
    seconds,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def in_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def test_consumer_span_continues_the_published_traceparent(
    nats_server: NatsServer,
) -> None:
    """The consumer span has the header's trace id and parent, kind CONSUMER, semconv attrs."""
    provider, exporter = in_memory()
    async with (
        running_gateway(make_settings(nats_server.url), tracer_provider=provider) as gw,
        jetstream(nats_server.url) as js,
        websockets.connect(ws_url(gw)) as ws,
    ):
        await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
        await wait_until(lambda: len(gw.hub.active_connections) == 1, what="the client")
        ack = await js.publish(
            "levels.signals", b'{"traced": true}', headers={"traceparent": TRACEPARENT}
        )
        await asyncio.wait_for(ws.recv(), seconds(5))
        await wait_until(lambda: named(exporter, "process levels.signals"), what="the span")
    (consumer,) = named(exporter, "process levels.signals")
    assert consumer.kind is SpanKind.CONSUMER
    assert format(consumer.context.trace_id, "032x") == TRACE_ID
    assert consumer.parent is not None
    assert format(consumer.parent.span_id, "016x") == PARENT_ID
    assert [format(link.context.span_id, "016x") for link in consumer.links] == [PARENT_ID]
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "levels.signals",
        "messaging.consumer.group.name": "gateway_levels",
        "messaging.message.id": str(ack.seq),
        "messaging.message.body.size": len(b'{"traced": true}'),
    }
    (fanout,) = named(exporter, "fanout levels.signals")
    assert fanout.parent is not None
    assert fanout.parent.span_id == consumer.context.span_id
    assert (fanout.attributes or {})["gateway.fanout.clients"] == 1
    assert not [s for s in exporter.get_finished_spans() if "send" in s.name], "no per-frame spans"


async def test_invalid_message_span_is_an_error_and_its_log_line_has_the_trace_id(
    nats_server: NatsServer,
) -> None:
    """A rejected message marks its span as an error; the log line carries the trace id."""
    provider, exporter = in_memory()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    handler.addFilter(logs.TraceIdFilter())
    logging.getLogger("gateway.relay").addHandler(handler)
    try:
        async with (
            running_gateway(make_settings(nats_server.url), tracer_provider=provider) as gw,
            jetstream(nats_server.url) as js,
        ):
            await wait_until(lambda: gw.relay.ready, what="the relay to subscribe")
            await js.publish("levels.signals", b"[1]", headers={"traceparent": TRACEPARENT})
            await wait_until(lambda: named(exporter, "process levels.signals"), what="the span")
    finally:
        logging.getLogger("gateway.relay").removeHandler(handler)
    (span,) = named(exporter, "process levels.signals")
    assert span.status.status_code is StatusCode.ERROR
    assert not named(exporter, "fanout levels.signals")
    (line,) = [line for line in stream.getvalue().splitlines() if "rejected" in line]
    assert "seq=1" in line
    assert line.endswith(f"trace_id={TRACE_ID}")


async def test_publisher_injects_traceparent_of_its_producer_span(
    nats_server: NatsServer,
) -> None:
    """`gateway publish` starts the trace: its message headers carry its PRODUCER span."""
    provider, exporter = in_memory()
    await publish(
        [nats_server.url],
        stream="LEVEL_SIGNALS",
        subject="levels.signals",
        count=1,
        rate_hz=100,
        tracer_provider=provider,
    )
    (producer,) = named(exporter, "send levels.signals")
    assert producer.kind is SpanKind.PRODUCER
    async with jetstream(nats_server.url) as js:
        raw = await js.get_last_msg("LEVEL_SIGNALS", "levels.signals")
    assert raw.headers is not None
    _, trace_id, span_id, _ = raw.headers["traceparent"].split("-")
    assert trace_id == format(producer.context.trace_id, "032x")
    assert span_id == format(producer.context.span_id, "016x")


async def test_console_exporter_prints_the_published_trace_id(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """A real gateway with OTEL_TRACES_EXPORTER=console prints spans of the published trace."""
    proc = gateway_process(
        {"NATS_URL": nats_server.url, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw"}
    )
    proc.wait_started()
    async with jetstream(nats_server.url) as js:
        await wait_until(lambda: "consuming levels.signals" in proc.output, what="the consumer")
        await js.publish("levels.signals", b'{"a": 1}', headers={"traceparent": TRACEPARENT})
        await wait_until(lambda: _consumer_count(js), what="the message to be consumed")
    os.kill(proc.proc.pid, signal.SIGTERM)  # shutdown flushes the batched spans
    assert await asyncio.to_thread(proc.wait_exit, 10) == 0
    assert f'"trace_id": "0x{TRACE_ID}"' in proc.output
    assert '"name": "process levels.signals"' in proc.output
    assert '"service.name": "gw"' in proc.output


async def test_unreachable_collector_does_not_hold_the_exit(
    nats_server: NatsServer, gateway_process: Callable[..., GatewayProcess]
) -> None:
    """With the collector down, the last spans are given up after a bound, said in one line,
    and the gateway still exits 0 well inside compose's 15 s grace: the exporter alone would
    retry for its whole OTEL_EXPORTER_OTLP_TIMEOUT (60 s here) first."""
    with socket.socket() as closed:  # bound, never listening: connection refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        proc = gateway_process(
            {
                "NATS_URL": nats_server.url,
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_TIMEOUT": "60",
                "OTEL_BSP_SCHEDULE_DELAY": "60000",  # the spans are still batched at exit
            }
        )
        port = proc.wait_started()
        async with httpx.AsyncClient() as http:  # a request span to export
            assert (await http.get(f"http://127.0.0.1:{port}/")).status_code == 200
        os.kill(proc.proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait_exit, 15) == 0, proc.output
    assert "spans not flushed within 2s" in proc.output


async def test_publisher_stopped_by_sigterm_flushes_its_spans_and_exits_0(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`docker stop` of the compose publisher: SIGTERM ends `gateway publish` cleanly (exit 0,
    its batched PRODUCER spans printed), not with exit 143 and the spans lost."""
    out = tmp_path / "publisher.out"
    env = {**os.environ, "NATS_URL": nats_server.url, "OTEL_TRACES_EXPORTER": "console"}
    with out.open("w") as sink:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "gateway", "publish", "--rate", "20"],
            env={**env, "OTEL_BSP_SCHEDULE_DELAY": "60000"},  # spans wait for the exit
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            async with jetstream(nats_server.url) as js:

                async def published() -> bool:
                    try:
                        return (await js.stream_info("LEVEL_SIGNALS")).state.messages >= 3
                    except Exception:  # the stream is not created yet
                        return False

                await wait_until(published, what="three published messages")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), seconds(10)) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert '"name": "send levels.signals"' in out.read_text()


async def _consumer_count(js: object) -> bool:
    info = await js.consumer_info("LEVEL_SIGNALS", "gateway_levels")  # type: ignore[attr-defined]
    return bool(info.delivered.stream_seq >= 1 and info.num_ack_pending == 0)


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_off_unless_asked_for(env: dict[str, str], enabled: bool) -> None:
    """No exporter configured means no TracerProvider at all: tracing costs nothing."""
    provider = provider_from_env(env, default_service="gateway")
    assert (provider is not None) == enabled
    if provider is not None:
        provider.shutdown()


def test_unknown_exporter_is_a_configuration_error() -> None:
    """An exporter name the gateway does not know stops the start, naming the variable."""
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "zipkin"}, default_service="gateway")


def test_tracing_cost_tool_runs_and_shows_the_spans_cost() -> None:
    """`loadtest/tracing_cost.py` drives the per-message path in memory; a tiny run keeps it
    from rotting (it once fed the hub a sink without the hub's methods, and nothing noticed)."""
    tool = Path(__file__).resolve().parents[1] / "loadtest" / "tracing_cost.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--clients", "10", "--messages", "300", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "client dropped" not in done.stdout + done.stderr, "every fake client took every frame"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Two spans per message cost several times the untraced path (~9 µs vs ~85 µs here).
    assert report["us_per_message_on"] > report["us_per_message_off"] > 0, report
