"""Logging: one line per event, readable text by default, JSON for log shippers.

A line logged while a span is current (say, rejecting a NATS message inside its consumer
span) carries that span's trace id, so a log line leads to its trace.

Secrets never reach a log line: a client's `?token=` and any password in a URL are
replaced by `***` in every record, whichever library wrote it (uvicorn writes the request
path with its query string). Per-connection lines (a WebSocket accepted, opened, closed,
refused) are noise at thousands of clients: they are dropped unless `GATEWAY_ACCESS_LOG`
is on; metrics count connections either way.
"""

from __future__ import annotations

import logging
import re
import sys

import msgspec
from opentelemetry import trace

_encode = msgspec.json.Encoder().encode
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(trace_suffix)s"

# `token=…` (also access_token, auth_token, password, secret) in a query string, and the
# password or token part of a URL's userinfo (`scheme://user:pw@` or `scheme://tok@`).
_SECRET_PARAM = re.compile(r"(?i)(\b(?:access_token|auth_token|token|password|secret)=)[^&\s\"']*")
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^/@\s\"']*)@")
# uvicorn's and websockets' lines about a single connection (all on "uvicorn.error").
_CONNECTION_LINES = frozenset(
    {
        '%s - "WebSocket %s" [accepted]',
        '%s - "WebSocket %s" 403',
        '%s - "WebSocket %s" %d',
        "connection open",
        "connection closed",
    }
)


def redact(text: str) -> str:
    """`text` with query-string secrets and URL passwords replaced by `***`."""
    text = _SECRET_PARAM.sub(r"\1***", text)
    return _URL_USERINFO.sub(_hide_userinfo, text)


def _hide_userinfo(match: re.Match[str]) -> str:
    user, has_password, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}:***@" if has_password else f"{match.group(1)}***@"


class RedactFilter(logging.Filter):
    """Rewrites every record's message without secrets (see `redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class ConnectionLinesFilter(logging.Filter):
    """Drops the per-connection lines of uvicorn and websockets."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "uvicorn.error" and record.msg in _CONNECTION_LINES)


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


def configure(log_format: str, level: int = logging.INFO, *, access_log: bool = False) -> None:
    """Send every log line to stderr in `log_format` (`text` or `json`), secrets redacted;
    per-connection lines only with `access_log`."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    if not access_log:
        handler.addFilter(ConnectionLinesFilter())
    handler.addFilter(RedactFilter())
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # we log NATS' state changes ourselves
