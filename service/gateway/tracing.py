"""OpenTelemetry: a TracerProvider from the standard `OTEL_*` variables, and the NATS glue.

Tracing is off unless asked for (`OTEL_TRACES_EXPORTER=otlp|console`, or an
`OTEL_EXPORTER_OTLP_ENDPOINT`), and off means no provider at all: the relay then skips
every tracing call, so the default costs nothing. `OTEL_SDK_DISABLED=true` wins over all.

Across NATS the W3C trace context travels in message headers (`traceparent`), injected by
the publisher and extracted by the relay, so one trace runs publisher → gateway consumer
span → fan-out span.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

EXPORTERS = ("otlp", "console", "none")
# Exiting waits this long for the last spans. An unreachable collector would otherwise
# hold the exit for the exporter's whole retry window (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by
# default), past compose's stop_grace_period and into a SIGKILL.
FLUSH_ON_EXIT_S = 2.0

log = logging.getLogger(__name__)


class TracingConfigError(ValueError):
    """An `OTEL_*` value the gateway cannot honour; the message names the variable."""


def provider_from_env(env: Mapping[str, str], default_service: str) -> TracerProvider | None:
    """A TracerProvider configured from `OTEL_*`, or None when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        names = "otlp" if _otlp_endpoint_set(env) else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in EXPORTERS:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER must be among {EXPORTERS}, got {name!r}"
            )
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            _check_otlp_protocol(env)
            exporters.append(_otlp_exporter())
    if not exporters:
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or default_service})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shut_down(provider: TracerProvider, within_s: float = FLUSH_ON_EXIT_S) -> bool:
    """Flush the batched spans and stop exporting, waiting at most `within_s` seconds.

    True if everything was exported in time; else the rest is dropped, said in one line.
    The SDK's own shutdown waits up to 30 s for an exporter that keeps retrying, so it runs
    in a daemon thread, which the interpreter does not wait for at exit.
    """
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(within_s)
    if worker.is_alive():
        log.warning(
            "spans not flushed within %.0fs (the trace collector does not answer); "
            "exiting without them",
            within_s,
        )
        return False
    return True


def _otlp_endpoint_set(env: Mapping[str, str]) -> bool:
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _check_otlp_protocol(env: Mapping[str, str]) -> None:
    """Refuse a protocol we do not ship, rather than silently speak another one."""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(variable, "").strip().lower()
        if value and value != "http/protobuf":
            raise TracingConfigError(
                f"{variable} must be http/protobuf (the gateway ships the OTLP/HTTP exporter, "
                f"port 4318), got {value!r}"
            )
        if value:
            return  # the traces-specific variable wins over the general one


def _otlp_exporter() -> SpanExporter:
    # HTTP/protobuf: a fraction of gRPC's weight; the endpoint and headers come from env.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads trace headers from NATS message headers, case-insensitively (may be None)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            lowered = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == lowered), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


HEADER_GETTER = _HeaderGetter()


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by NATS message headers (an empty context if none)."""
    return propagate.extract(headers or {}, getter=HEADER_GETTER)


def inject(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into NATS message headers."""
    propagate.inject(headers)


def _messaging(operation: str, subject: str, body_size: int) -> dict[str, str | int]:
    """The OpenTelemetry messaging attributes both ends of a NATS message share."""
    return {
        "messaging.system": "nats",
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
        "messaging.destination.name": subject,
        "messaging.message.body.size": body_size,
    }


@contextlib.contextmanager
def producer_span(tracer: trace.Tracer, subject: str, body_size: int) -> Iterator[dict[str, str]]:
    """A PRODUCER span `send <subject>`; yields the headers that carry it to the consumer."""
    with tracer.start_as_current_span(
        f"send {subject}",
        kind=trace.SpanKind.PRODUCER,
        attributes=_messaging("send", subject, body_size),
    ):
        headers: dict[str, str] = {}
        inject(headers)
        yield headers


def consumer_span(
    tracer: trace.Tracer,
    headers: Mapping[str, str] | None,
    subject: str,
    seq: int,
    body_size: int,
    group: str | None,
) -> contextlib.AbstractContextManager[trace.Span]:
    """A CONSUMER span `process <subject>` continuing the trace in the message headers."""
    parent = extract(headers)
    producer = trace.get_current_span(parent).get_span_context()
    attributes = _messaging("process", subject, body_size)
    attributes["messaging.message.id"] = str(seq)
    if group:
        attributes["messaging.consumer.group.name"] = group
    return tracer.start_as_current_span(
        f"process {subject}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=[trace.Link(producer)] if producer.is_valid else None,
        attributes=attributes,
    )
