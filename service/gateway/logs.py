"""Logging: one line per event, readable text by default, JSON for log shippers.

A line logged while a span is current (say, rejecting a NATS message inside its consumer
span) carries that span's trace id, so a log line leads to its trace.
"""

from __future__ import annotations

import logging
import sys

import msgspec
from opentelemetry import trace

_encode = msgspec.json.Encoder().encode
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(trace_suffix)s"


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` (hex, or '') and `trace_suffix` (' trace_id=…' or '') to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        record.trace_id = trace_id
        record.trace_suffix = f" trace_id={trace_id}" if trace_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg"[, "trace_id"][, "exc"]}`, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            doc["trace_id"] = trace_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _encode(doc).decode()


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Send every log line to stderr in `log_format` (`text` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # we log NATS' state changes ourselves
