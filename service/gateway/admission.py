"""Admission: who may open `/ws/stream`. Pure functions, checked before accepting.

- Origin: when an allow-list is set, a browser's `Origin` must match one entry exactly
  (scheme, host, port; host case-insensitive). A request with no `Origin` header is not a
  browser and is not refused by this rule (SPEC): the rule protects browsers' users.
- Token: when set, the client presents it as `?token=` or `Authorization: Bearer`;
  compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl

from gateway.settings import Settings, normalize_origin


class Refusal(StrEnum):
    """Why a handshake was refused; the value is the metric label and the HTTP status."""

    ORIGIN = "origin"
    AUTH = "auth"

    @property
    def status(self) -> int:
        return 403 if self is Refusal.ORIGIN else 401


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """True if `origin` may connect under the allow-list `allowed` (empty = any)."""
    if not allowed or origin is None:
        return True
    try:
        return normalize_origin(origin) in allowed
    except ValueError:  # "null", garbage, a non-http scheme: not on any list
        return False


def token_presented(query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The token the client sent, from `?token=` or `Authorization: Bearer`, else ''."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query.get("token", "")


def refusal(
    settings: Settings, query: Mapping[str, str], headers: Mapping[str, str]
) -> Refusal | None:
    """The reason to refuse this handshake, or None to accept it."""
    if not origin_allowed(headers.get("origin"), settings.allowed_origins):
        return Refusal.ORIGIN
    if settings.auth_token and not hmac.compare_digest(
        token_presented(query, headers).encode(), settings.auth_token.encode()
    ):
        return Refusal.AUTH
    return None


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """The two request headers admission reads (`origin`, `authorization`), from a raw
    ASGI scope: nothing else parsed, nothing kept. (Litestar's parsed headers and query
    would be built and cached on the scope for the connection's whole life: a few
    hundred bytes times every client.)"""
    wanted = (b"origin", b"authorization")
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in scope["headers"] if n in wanted}


def scope_refusal(
    settings: Settings, scope: Mapping[str, Any], headers: Mapping[str, str]
) -> Refusal | None:
    """`refusal` for a raw ASGI scope (WebSocket or HTTP) whose `scope_headers` are given."""
    raw_query = scope["query_string"].decode("latin-1") if settings.auth_token else ""
    return refusal(settings, dict(parse_qsl(raw_query)), headers)
