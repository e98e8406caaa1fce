"""Configuration: one frozen value, built once from an environment mapping.

`Settings.from_env(os.environ)` validates every variable and raises `SettingsError`
naming the variable on the first bad value; only the CLI turns that into an exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec

NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})

T = TypeVar("T", int, float)


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the gateway reads from its environment, validated."""

    nats_servers: tuple[str, ...] = ("nats://localhost:4222",)
    """NATS server URLs (`NATS_URL`, comma-separated); credentials allowed, never shown."""
    host: str = "0.0.0.0"  # noqa: S104 - listening on every interface is the container default
    """HTTP + WebSocket listen address (`GATEWAY_HOST`)."""
    port: int = 8000
    """HTTP + WebSocket listen port (`GATEWAY_PORT`); 0 picks a free port."""
    stream: str = "LEVEL_SIGNALS"
    """JetStream stream holding the subject (`GATEWAY_STREAM`)."""
    subject: str = "levels.signals"
    """Subject relayed to clients (`GATEWAY_SUBJECT`)."""
    durable: str = "gateway_levels"
    """Durable consumer (base) name; empty = an ephemeral consumer per process
    (`GATEWAY_DURABLE`). With leases each replica claims `<name>`, `<name>_2`, ..."""
    consumer_lease: bool = True
    """Claim the durable's name through a lease in NATS KV, so replicas with one
    environment never share a consumer (`GATEWAY_CONSUMER_LEASE`, 0 = use it as given)."""
    lease_ttl_s: float = 10.0
    """A dead replica's consumer name is free again after this long (`GATEWAY_LEASE_TTL_S`)."""
    consumer_inactive_s: float = 600.0
    """The server deletes a durable nobody pulled from for this long
    (`GATEWAY_CONSUMER_INACTIVE_S`): consumers of gone replicas do not pile up."""
    replica_id: str = ""
    """This replica's identity in leases and logs; empty = the hostname (`GATEWAY_REPLICA_ID`)."""
    stream_replicas: int = 1
    """Copies of the stream and the lease bucket when the gateway creates them
    (`GATEWAY_STREAM_REPLICAS`; 3 on a 3-node cluster)."""
    max_connections: int = 10_000
    """Clients beyond this are accepted then closed with 1013 (`GATEWAY_MAX_CONNECTIONS`)."""
    allowed_origins: frozenset[str] = frozenset()
    """Browser origins allowed to connect; empty = any (`GATEWAY_ALLOWED_ORIGINS`)."""
    auth_token: str = ""
    """Shared token clients must present; empty = off (`GATEWAY_AUTH_TOKEN`)."""
    drain_s: float = 2.0
    """Shutdown spreads 1001 closes over this many seconds (`GATEWAY_DRAIN_S`)."""
    send_timeout_s: float = 5.0
    """A client whose send stalls longer is disconnected (`GATEWAY_SEND_TIMEOUT_S`)."""
    handshake_timeout_s: float = 10.0
    """A connection whose HTTP request head has not arrived by then is closed
    (`GATEWAY_HANDSHAKE_TIMEOUT_S`)."""
    ping_interval_s: float = 20.0
    """WebSocket ping period; a client that does not answer within it is closed, which
    finds half-open connections (`GATEWAY_PING_INTERVAL_S`, 0 = off)."""
    ws_compression: bool = True
    """Offer permessage-deflate, each message compressed once for every client that takes
    it (`GATEWAY_WS_COMPRESSION`, on/off)."""
    max_inbound_bytes: int = 65_536
    """Largest frame a client may send; larger closes it with 1009 (`GATEWAY_MAX_INBOUND_BYTES`)."""
    max_payload_bytes: int = 1_048_576
    """Largest NATS message relayed; larger is counted invalid (`GATEWAY_MAX_PAYLOAD_BYTES`)."""
    log_format: str = "text"
    """`text` for people, `json` for log shippers (`GATEWAY_LOG_FORMAT`)."""
    access_log: bool = False
    """A log line per HTTP request and per WebSocket connection (`GATEWAY_ACCESS_LOG`)."""
    workers: int = 1
    """Worker processes sharing the port, each with its own consumer (`GATEWAY_WORKERS`)."""
    live_view: bool = True
    """Serve the live view page at `/` (`GATEWAY_LIVE_VIEW`, 0 turns it off)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; raise `SettingsError` on a bad value."""
        return cls(
            nats_servers=_nats_servers(env.get("NATS_URL", "nats://localhost:4222")),
            host=_text(env, "GATEWAY_HOST", "0.0.0.0"),  # noqa: S104 - see field
            port=_number(env, "GATEWAY_PORT", int, 8000, 0, 65_535),
            stream=_text(env, "GATEWAY_STREAM", "LEVEL_SIGNALS"),
            subject=_text(env, "GATEWAY_SUBJECT", "levels.signals"),
            durable=_name(env, "GATEWAY_DURABLE", "gateway_levels"),
            consumer_lease=_flag(env, "GATEWAY_CONSUMER_LEASE", default=True),
            lease_ttl_s=_number(env, "GATEWAY_LEASE_TTL_S", float, 10.0, 2.0, 300.0),
            consumer_inactive_s=_number(
                env, "GATEWAY_CONSUMER_INACTIVE_S", float, 600.0, 1.0, 30 * 86_400.0
            ),
            replica_id=env.get("GATEWAY_REPLICA_ID", "").strip(),
            stream_replicas=_number(env, "GATEWAY_STREAM_REPLICAS", int, 1, 1, 5),
            max_connections=_number(env, "GATEWAY_MAX_CONNECTIONS", int, 10_000, 1, 10_000_000),
            allowed_origins=_origins(env.get("GATEWAY_ALLOWED_ORIGINS", "")),
            auth_token=env.get("GATEWAY_AUTH_TOKEN", "").strip(),
            drain_s=_number(env, "GATEWAY_DRAIN_S", float, 2.0, 0.0, 300.0),
            send_timeout_s=_number(env, "GATEWAY_SEND_TIMEOUT_S", float, 5.0, 0.01, 300.0),
            handshake_timeout_s=_number(
                env, "GATEWAY_HANDSHAKE_TIMEOUT_S", float, 10.0, 0.05, 300.0
            ),
            ping_interval_s=_number(env, "GATEWAY_PING_INTERVAL_S", float, 20.0, 0.0, 3600.0),
            ws_compression=_flag(env, "GATEWAY_WS_COMPRESSION", default=True),
            max_inbound_bytes=_number(env, "GATEWAY_MAX_INBOUND_BYTES", int, 65_536, 1, 16 << 20),
            max_payload_bytes=_number(env, "GATEWAY_MAX_PAYLOAD_BYTES", int, 1 << 20, 2, 64 << 20),
            log_format=_choice(env, "GATEWAY_LOG_FORMAT", ("text", "json")),
            access_log=_flag(env, "GATEWAY_ACCESS_LOG", default=False),
            live_view=_flag(env, "GATEWAY_LIVE_VIEW", default=True),
            workers=_number(env, "GATEWAY_WORKERS", int, 1, 1, 64),
        )

    @property
    def nats_url_redacted(self) -> str:
        """The NATS server list as it may be printed or served: no passwords, no tokens."""
        return ",".join(redact_url(url) for url in self.nats_servers)


def redact_url(url: str) -> str:
    """Hide a URL's password or token, keeping a username: `nats://u:***@h:4222`.

    NATS reads a lone userinfo (`nats://s3cret@h`) as a token, so it is hidden too. Works on
    the raw text, not a parsed URL: a password with an unencoded `/`, `?` or `#` would end
    a parser's host part early and escape redaction.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostport = rest.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    shown = f"{user}:***" if has_password else "***"
    return f"{scheme}://{shown}@{hostport}"


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    if not value:
        raise SettingsError(f"{name} must not be empty")
    return value


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    """A JetStream consumer name (may be empty): letters, digits, `_` and `-` only."""
    value = env.get(name, default).strip()
    if len(value) > 200 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        raise SettingsError(
            f"{name} may hold only letters, digits, _ and - (at most 200), got {value!r}"
        )
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, choices[0]).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def _number(
    env: Mapping[str, str], name: str, kind: Callable[[str], T], default: T, low: T, high: T
) -> T:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise SettingsError(f"{name} must be {noun}, got {raw!r}") from None
    if not low <= value <= high:  # NaN fails this test too
        raise SettingsError(f"{name} must be between {low} and {high}, got {raw!r}")
    return value


def _nats_servers(raw: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not urls:
        raise SettingsError("NATS_URL must name at least one server")
    for url in urls:
        _check_nats_url(url)
    return urls


def _check_nats_url(url: str) -> None:
    # Error messages show the redacted URL: a typo must not leak a password to the logs.
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise SettingsError(f"NATS_URL is not a valid URL: {shown!r}") from None
    try:
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        raise SettingsError(f"NATS_URL has an invalid port: {shown!r}") from None
    if parts.scheme not in NATS_SCHEMES:
        expected = ", ".join(f"{s}://" for s in sorted(NATS_SCHEMES))
        raise SettingsError(f"NATS_URL must start with one of {expected}: {shown!r}")
    if not parts.hostname:
        raise SettingsError(f"NATS_URL has no host: {shown!r}")
    if port == 0:
        raise SettingsError(f"NATS_URL has an invalid port: {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SettingsError(
            f"NATS_URL must be scheme://[user:password@]host[:port] "
            f"(percent-encode / ? # in a password): {shown!r}"
        )


def _origins(raw: str) -> frozenset[str]:
    return frozenset(normalize_origin(o) for o in raw.split(",") if o.strip())


def normalize_origin(origin: str) -> str:
    """Canonical `scheme://host[:port]`: lower case, default ports dropped, no trailing slash.

    Raises SettingsError for anything that is not exactly an origin (userinfo, a path, a
    query): an allow-list entry must be unambiguous, and browsers never send those parts.
    """
    text = origin.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise SettingsError(f"GATEWAY_ALLOWED_ORIGINS has an invalid origin: {text!r}") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise SettingsError(f"GATEWAY_ALLOWED_ORIGINS has an invalid origin: {text!r}")
    default_port = 443 if parts.scheme == "https" else 80
    suffix = "" if port in (None, default_port) else f":{port}"
    return f"{parts.scheme}://{parts.hostname.lower()}{suffix}"
