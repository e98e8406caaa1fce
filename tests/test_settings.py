"""Settings: built from a plain mapping, every variable validated, secrets never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import quote

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.settings import Settings, SettingsError, redact_url

from conftest import seconds


def test_defaults_match_the_spec_table() -> None:
    """An empty environment gives exactly the defaults of SPEC's configuration table."""
    settings = Settings.from_env({})
    assert settings.nats_servers == ("nats://localhost:4222",)
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.stream == "LEVEL_SIGNALS"
    assert settings.subject == "levels.signals"
    assert settings.durable == "gateway_levels"
    assert settings.consumer_lease is True
    assert settings.lease_ttl_s == 10.0
    assert settings.consumer_inactive_s == 600.0
    assert settings.replica_id == ""
    assert settings.stream_replicas == 1
    assert settings.access_log is False
    assert settings.max_connections == 10_000
    assert settings.allowed_origins == frozenset()
    assert settings.auth_token == ""
    assert settings.drain_s == 2.0
    assert settings.send_timeout_s == 5.0
    assert settings.max_inbound_bytes == 65_536
    assert settings.max_payload_bytes == 1_048_576
    assert settings.log_format == "text"
    assert settings.live_view is True


def test_settings_are_frozen() -> None:
    """A Settings value cannot be changed after it was built."""
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("NATS_URL", "nats://nats:4222", "nats_servers", ("nats://nats:4222",)),
        (
            "NATS_URL",
            " nats://a:4222 ,, tls://b:4223,",
            "nats_servers",
            ("nats://a:4222", "tls://b:4223"),
        ),
        ("NATS_URL", "ws://h:8080,wss://h", "nats_servers", ("ws://h:8080", "wss://h")),
        ("NATS_URL", "nats://[::1]:4222", "nats_servers", ("nats://[::1]:4222",)),
        ("GATEWAY_HOST", " 127.0.0.1 ", "host", "127.0.0.1"),
        ("GATEWAY_HOST", "::", "host", "::"),
        ("GATEWAY_PORT", "0", "port", 0),
        ("GATEWAY_PORT", "65535", "port", 65_535),
        ("GATEWAY_PORT", " 9000 ", "port", 9000),
        ("GATEWAY_PORT", "", "port", 8000),
        ("GATEWAY_STREAM", "OTHER", "stream", "OTHER"),
        ("GATEWAY_SUBJECT", "levels.other", "subject", "levels.other"),
        ("GATEWAY_DURABLE", "mine", "durable", "mine"),
        ("GATEWAY_DURABLE", "", "durable", ""),
        ("GATEWAY_DURABLE", "   ", "durable", ""),
        ("GATEWAY_DURABLE", "gw-Levels_1", "durable", "gw-Levels_1"),
        ("GATEWAY_CONSUMER_LEASE", "0", "consumer_lease", False),
        ("GATEWAY_LEASE_TTL_S", "2.5", "lease_ttl_s", 2.5),
        ("GATEWAY_CONSUMER_INACTIVE_S", "30", "consumer_inactive_s", 30.0),
        ("GATEWAY_REPLICA_ID", " gateway-7c9f-x2 ", "replica_id", "gateway-7c9f-x2"),
        ("GATEWAY_STREAM_REPLICAS", "3", "stream_replicas", 3),
        ("GATEWAY_ACCESS_LOG", "1", "access_log", True),
        ("GATEWAY_MAX_CONNECTIONS", "1", "max_connections", 1),
        (
            "GATEWAY_ALLOWED_ORIGINS",
            "https://App.Example.com:443/, http://localhost:3000",
            "allowed_origins",
            frozenset({"https://app.example.com", "http://localhost:3000"}),
        ),
        ("GATEWAY_ALLOWED_ORIGINS", " , ", "allowed_origins", frozenset()),
        ("GATEWAY_AUTH_TOKEN", " t0ken ", "auth_token", "t0ken"),
        ("GATEWAY_DRAIN_S", "0", "drain_s", 0.0),
        ("GATEWAY_DRAIN_S", "0.5", "drain_s", 0.5),
        ("GATEWAY_SEND_TIMEOUT_S", "1.5", "send_timeout_s", 1.5),
        ("GATEWAY_MAX_INBOUND_BYTES", "1024", "max_inbound_bytes", 1024),
        ("GATEWAY_MAX_PAYLOAD_BYTES", "4096", "max_payload_bytes", 4096),
        ("GATEWAY_LOG_FORMAT", "JSON", "log_format", "json"),
        ("GATEWAY_LIVE_VIEW", "0", "live_view", False),
        ("GATEWAY_LIVE_VIEW", "off", "live_view", False),
        ("GATEWAY_LIVE_VIEW", "Yes", "live_view", True),
    ],
)
def test_every_variable_is_parsed(variable: str, raw: str, field: str, expected: object) -> None:
    """Each variable sets its field, trimmed and normalised; empty numbers mean the default."""
    assert getattr(Settings.from_env({variable: raw}), field) == expected


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("GATEWAY_PORT", "abc"),
        ("GATEWAY_PORT", "70000"),
        ("GATEWAY_PORT", "65536"),
        ("GATEWAY_PORT", "-1"),
        ("GATEWAY_PORT", "1e3"),
        ("GATEWAY_PORT", "80.0"),
        ("GATEWAY_PORT", "0x50"),
        ("GATEWAY_PORT", "nan"),
        ("GATEWAY_HOST", ""),
        ("GATEWAY_HOST", "   "),
        ("GATEWAY_STREAM", ""),
        ("GATEWAY_SUBJECT", " "),
        ("GATEWAY_DURABLE", "a.b"),
        ("GATEWAY_DURABLE", "levels*"),
        ("GATEWAY_DURABLE", "gateway levels"),
        ("GATEWAY_DURABLE", "gatéway"),
        ("GATEWAY_DURABLE", "x" * 201),
        ("GATEWAY_CONSUMER_LEASE", "sometimes"),
        ("GATEWAY_LEASE_TTL_S", "1.5"),
        ("GATEWAY_CONSUMER_INACTIVE_S", "0"),
        ("GATEWAY_STREAM_REPLICAS", "0"),
        ("GATEWAY_STREAM_REPLICAS", "7"),
        ("GATEWAY_MAX_CONNECTIONS", "0"),
        ("GATEWAY_MAX_CONNECTIONS", "ten"),
        ("GATEWAY_MAX_CONNECTIONS", "1e3"),
        ("GATEWAY_DRAIN_S", "nan"),
        ("GATEWAY_DRAIN_S", "inf"),
        ("GATEWAY_DRAIN_S", "-inf"),
        ("GATEWAY_DRAIN_S", "-1"),
        ("GATEWAY_DRAIN_S", "2s"),
        ("GATEWAY_SEND_TIMEOUT_S", "0"),
        ("GATEWAY_SEND_TIMEOUT_S", "NaN"),
        ("GATEWAY_SEND_TIMEOUT_S", "Infinity"),
        ("GATEWAY_MAX_INBOUND_BYTES", "64KiB"),
        ("GATEWAY_MAX_INBOUND_BYTES", "0"),
        ("GATEWAY_MAX_PAYLOAD_BYTES", "1e3"),
        ("GATEWAY_MAX_PAYLOAD_BYTES", "1"),
        ("GATEWAY_LOG_FORMAT", "xml"),
        ("GATEWAY_LIVE_VIEW", "maybe"),
        ("NATS_URL", ""),
        ("NATS_URL", " , "),
        ("NATS_URL", "http://x"),
        ("NATS_URL", "nats://"),
        ("NATS_URL", "nats://h:99999"),
        ("NATS_URL", "nats://h:0"),
        ("NATS_URL", "nats://h:-1"),
        ("NATS_URL", "nats://h:port"),
        ("NATS_URL", "localhost:4222"),
        ("NATS_URL", "nats://good:4222,http://bad:4222"),
        ("NATS_URL", "nats://good:4222,nats://bad:99999"),
        ("NATS_URL", "nats://[::1"),
        ("NATS_URL", "nats://[not-an-ip]:4222"),
        ("GATEWAY_ALLOWED_ORIGINS", "*"),
        ("GATEWAY_ALLOWED_ORIGINS", "null"),
        ("GATEWAY_ALLOWED_ORIGINS", "app.example.com"),
        ("GATEWAY_ALLOWED_ORIGINS", "ftp://app.example.com"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://app.example.com:99999"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://app.example.com:abc"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://ok.example.com,garbage"),
        ("GATEWAY_ALLOWED_ORIGINS", "http://[x"),
    ],
)
def test_bad_value_raises_settings_error_naming_the_variable(variable: str, raw: str) -> None:
    """A bad value fails with SettingsError (not any other error) whose message names it."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: raw})
    assert variable in str(caught.value)
    assert "\n" not in str(caught.value), "one line"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://u:s3cret@h:4222", "nats://u:***@h:4222"),
        ("nats://s3cret@h:4222", "nats://***@h:4222"),
        ("tls://user:s3cret@h", "tls://user:***@h"),
        ("nats://u:p@ss@h:4222", "nats://u:***@h:4222"),
        ("nats://u:s3cret:more@h:4222", "nats://u:***@h:4222"),
        ("nats://:s3cret@h:4222", "nats://:***@h:4222"),
        ("nats://h:4222", "nats://h:4222"),
        ("nats://localhost", "nats://localhost"),
    ],
)
def test_redact_url_hides_passwords_and_tokens_keeps_usernames(url: str, expected: str) -> None:
    """Passwords and lone tokens become ***; a username and the host stay readable."""
    assert redact_url(url) == expected


def test_redacted_server_list_hides_every_secret() -> None:
    """`nats_url_redacted` redacts each server of a comma list."""
    settings = Settings.from_env({"NATS_URL": "nats://a:pw1@h1:4222,nats://tok2@h2:4222"})
    shown = settings.nats_url_redacted
    assert shown == "nats://a:***@h1:4222,nats://***@h2:4222"
    assert "pw1" not in shown
    assert "tok2" not in shown


@pytest.mark.parametrize(
    "url",
    [
        "nats://u:s3cret@h:badport",
        "nats://u:s3cret@h:99999",
        "http://u:s3cret@h:4222",
        "nats://u:s3cret@",
        "nats://s3cret@:4222",
        "nats://ok:4222,http://u:s3cret@h",
        "nats://u:s3cret@[::1",
    ],
)
def test_error_message_never_leaks_the_password(url: str) -> None:
    """A malformed NATS_URL with credentials is reported without its secret."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"NATS_URL": url})
    assert "NATS_URL" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("password", ["s3/cret", "s3?cret", "s3#cret", "12/34"])
def test_password_with_reserved_characters_never_leaks(password: str) -> None:
    """A password pasted unencoded ('/', '?', '#') shows neither in an error nor redacted."""
    try:
        shown = Settings.from_env({"NATS_URL": f"nats://u:{password}@h:4222"}).nats_url_redacted
    except SettingsError as exc:
        shown = str(exc)
    assert password not in shown


# Userinfo as RFC 3986 spells it: anything, percent-encoded.
_userinfo = st.text(min_size=1, max_size=20).map(lambda s: quote(s, safe=""))
_hosts = st.from_regex(r"\A[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,15}){0,2}\Z")


@hypothesis.settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(["nats", "tls", "ws", "wss"]),
    user=_userinfo,
    password=_userinfo,
    host=_hosts,
    port=st.integers(1, 65_535),
)
def test_redacted_url_never_contains_the_password(
    scheme: str, user: str, password: str, host: str, port: int
) -> None:
    """For any user, password, host and port, redaction keeps the user and drops the password."""
    url = f"{scheme}://{user}:{password}@{host}:{port}"
    hypothesis.assume(password not in f"{scheme}://{user}:***@{host}:{port}")
    redacted = redact_url(url)
    assert redacted == f"{scheme}://{user}:***@{host}:{port}"
    settings = Settings.from_env({"NATS_URL": url})
    assert password not in settings.nats_url_redacted


@hypothesis.settings(max_examples=100, deadline=None)
@given(token=_userinfo, host=_hosts)
def test_redacted_url_never_contains_a_lone_token(token: str, host: str) -> None:
    """A lone userinfo (a NATS token) is always hidden."""
    hypothesis.assume(token not in f"nats://***@{host}")
    assert token not in redact_url(f"nats://{token}@{host}")


@hypothesis.settings(max_examples=150, deadline=None)
@given(port=st.one_of(st.integers(-100_000, 200_000), st.integers()))
def test_port_parses_in_range_and_errors_outside(port: int) -> None:
    """GATEWAY_PORT n parses to n for 0..65535 and raises SettingsError naming it otherwise."""
    if 0 <= port <= 65_535:
        assert Settings.from_env({"GATEWAY_PORT": str(port)}).port == port
    else:
        with pytest.raises(SettingsError, match="GATEWAY_PORT"):
            Settings.from_env({"GATEWAY_PORT": str(port)})


@hypothesis.settings(max_examples=150, deadline=None)
@given(port=st.integers(-100_000, 200_000))
def test_nats_url_port_parses_in_range_and_errors_outside(port: int) -> None:
    """NATS_URL's port is accepted for 1..65535 and refused with SettingsError otherwise."""
    url = f"nats://h:{port}"
    if 1 <= port <= 65_535:
        assert Settings.from_env({"NATS_URL": url}).nats_servers == (url,)
    else:
        with pytest.raises(SettingsError, match="NATS_URL"):
            Settings.from_env({"NATS_URL": url})


# Text that looks like a URL often enough to reach the parser's corners.
_urlish = st.one_of(
    st.text(max_size=30),
    st.builds(
        str.__add__,
        st.sampled_from(["nats://", "tls://", "http://", "nats://u:pw@", "https://"]),
        st.text(alphabet="[]:@/?#%.,-_ aZ09\u0430\uff0f", max_size=20),
    ),
)


@hypothesis.settings(max_examples=150, deadline=None)
@given(raw=_urlish)
def test_any_nats_url_text_parses_or_raises_settings_error(raw: str) -> None:
    """Whatever NATS_URL holds, from_env returns settings or raises SettingsError, nothing else."""
    try:
        Settings.from_env({"NATS_URL": raw})
    except SettingsError as exc:
        message = str(exc)
    else:
        return
    assert "NATS_URL" in message


@hypothesis.settings(max_examples=150, deadline=None)
@given(raw=_urlish)
def test_any_allowed_origins_text_parses_or_raises_settings_error(raw: str) -> None:
    """Whatever GATEWAY_ALLOWED_ORIGINS holds, the outcome is settings or a SettingsError."""
    try:
        Settings.from_env({"GATEWAY_ALLOWED_ORIGINS": raw})
    except SettingsError as exc:
        message = str(exc)
    else:
        return
    assert "GATEWAY_ALLOWED_ORIGINS" in message


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("GATEWAY_PORT", "abc"),
        ("NATS_URL", "http://x"),
        ("NATS_URL", "nats://u:s3cret@h:badport"),
        ("NATS_URL", "nats://[::1"),
        ("GATEWAY_ALLOWED_ORIGINS", "http://[x"),
    ],
)
def test_cli_bad_setting_exits_2_with_one_line_and_no_traceback(variable: str, raw: str) -> None:
    """`python -m gateway` with a bad value exits 2, printing one stderr line naming it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "NATS_", "OTEL_"))}
    env[variable] = raw
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds(30),
        check=False,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert done.stdout == "", "nothing is served, no banner"
