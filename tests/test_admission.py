"""Admission policy: which handshakes are refused, and why. Pure functions, table-driven."""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission import Refusal, origin_allowed, refusal, token_presented
from gateway.metrics import REJECT_REASONS
from gateway.settings import Settings, normalize_origin

# Built through the real configuration path, written the way an operator might.
ALLOWED = Settings.from_env(
    {"GATEWAY_ALLOWED_ORIGINS": "https://App.Example.com:443/, http://localhost:3000"}
).allowed_origins

ORIGINS: list[tuple[str, str | None, bool]] = [
    ("exact https origin", "https://app.example.com", True),
    ("exact http origin with port", "http://localhost:3000", True),
    ("missing header (not a browser)", None, True),
    ("host in mixed case", "https://APP.Example.COM", True),
    ("scheme in upper case", "HTTPS://app.example.com", True),
    ("explicit default https port", "https://app.example.com:443", True),
    ("trailing slash", "https://app.example.com/", True),
    ("empty header string", "", False),
    ("null origin (sandboxed iframe, file://)", "null", False),
    ("different scheme", "http://app.example.com", False),
    ("different port", "https://app.example.com:8443", False),
    ("https default port on http", "http://app.example.com:443", False),
    ("allowed port missing", "http://localhost", False),
    ("allowed port replaced by default", "http://localhost:80", False),
    ("websocket scheme", "wss://app.example.com", False),
    ("subdomain of allowed host", "https://sub.app.example.com", False),
    ("allowed host as prefix of evil domain", "https://app.example.com.evil.com", False),
    ("allowed host as suffix of evil label", "https://evilapp.example.com", False),
    ("allowed host as userinfo", "https://app.example.com@evil.com", False),
    ("allowed host in path", "https://evil.com/app.example.com", False),
    ("cyrillic a homoglyph", "https://\u0430pp.example.com", False),
    ("punycode homoglyph", "https://xn--pp-8kc.example.com", False),
    ("fullwidth dot", "https://app\uff0eexample.com", False),
    ("trailing dot fqdn", "https://app.example.com.", False),
    ("port out of range", "https://app.example.com:99999", False),
    ("port not a number", "https://app.example.com:abc", False),
    ("broken ipv6 literal", "https://[::1", False),
    ("nul byte", "https://app.example.com\x00", False),
    ("no scheme", "app.example.com", False),
    ("wildcard", "*", False),
]


@pytest.mark.parametrize(
    ("origin", "expected"),
    [(origin, expected) for _, origin, expected in ORIGINS],
    ids=[name for name, _, _ in ORIGINS],
)
def test_origin_must_match_an_allowed_entry_exactly(origin: str | None, expected: bool) -> None:
    """Scheme, host (any case) and port (default or explicit) must match; tricks do not."""
    assert origin_allowed(origin, ALLOWED) is expected


@pytest.mark.parametrize(
    "origin", [None, "", "null", "https://evil.com", "garbage", "https://[::1"]
)
def test_empty_allow_list_allows_any_origin(origin: str | None) -> None:
    """With no GATEWAY_ALLOWED_ORIGINS, every Origin (or none) passes the origin rule."""
    assert origin_allowed(origin, frozenset()) is True


TOKENS: list[tuple[str, dict[str, str], dict[str, str], str]] = [
    ("query token", {"token": "abc"}, {}, "abc"),
    ("bearer header", {}, {"authorization": "Bearer abc"}, "abc"),
    ("lower-case bearer", {}, {"authorization": "bearer abc"}, "abc"),
    ("upper-case bearer", {}, {"authorization": "BEARER abc"}, "abc"),
    ("bearer with padding", {}, {"authorization": "Bearer   abc  "}, "abc"),
    ("nothing presented", {}, {}, ""),
    ("empty query token", {"token": ""}, {}, ""),
    ("bearer without credentials", {}, {"authorization": "Bearer"}, ""),
    ("bearer with blank credentials", {}, {"authorization": "Bearer   "}, ""),
    ("basic scheme is not a token", {}, {"authorization": "Basic abc"}, ""),
    ("scheme glued to token", {}, {"authorization": "Bearerabc"}, ""),
    ("basic header falls back to query", {"token": "q"}, {"authorization": "Basic x"}, "q"),
    ("empty bearer falls back to query", {"token": "q"}, {"authorization": "Bearer "}, "q"),
]


@pytest.mark.parametrize(
    ("query", "headers", "expected"),
    [(q, h, e) for _, q, h, e in TOKENS],
    ids=[name for name, _, _, _ in TOKENS],
)
def test_token_is_taken_from_query_or_bearer_header(
    query: dict[str, str], headers: dict[str, str], expected: str
) -> None:
    """`?token=` or `Authorization: Bearer` (scheme in any case) yields the token, else ''."""
    assert token_presented(query, headers) == expected


GUARDED = Settings(allowed_origins=ALLOWED, auth_token="s3cret")
GOOD_ORIGIN = {"origin": "https://app.example.com"}

REFUSALS: list[tuple[str, Settings, dict[str, str], dict[str, str], Refusal | None]] = [
    ("good origin and query token", GUARDED, {"token": "s3cret"}, GOOD_ORIGIN, None),
    (
        "good origin and bearer token",
        GUARDED,
        {},
        {**GOOD_ORIGIN, "authorization": "Bearer s3cret"},
        None,
    ),
    ("no origin header and token", GUARDED, {"token": "s3cret"}, {}, None),
    (
        "foreign origin with token",
        GUARDED,
        {"token": "s3cret"},
        {"origin": "https://evil.com"},
        Refusal.ORIGIN,
    ),
    ("empty origin with token", GUARDED, {"token": "s3cret"}, {"origin": ""}, Refusal.ORIGIN),
    ("foreign origin, no token: origin first", GUARDED, {}, {"origin": "null"}, Refusal.ORIGIN),
    ("good origin, no token", GUARDED, {}, GOOD_ORIGIN, Refusal.AUTH),
    ("wrong token", GUARDED, {"token": "wrong"}, GOOD_ORIGIN, Refusal.AUTH),
    ("empty token", GUARDED, {"token": ""}, GOOD_ORIGIN, Refusal.AUTH),
    ("token prefix", GUARDED, {"token": "s3cre"}, GOOD_ORIGIN, Refusal.AUTH),
    ("token with extra suffix", GUARDED, {"token": "s3cretX"}, GOOD_ORIGIN, Refusal.AUTH),
    ("token in other case", GUARDED, {"token": "S3CRET"}, GOOD_ORIGIN, Refusal.AUTH),
    ("non-ascii token", GUARDED, {"token": "s3cr\u00e9t"}, GOOD_ORIGIN, Refusal.AUTH),
    (
        "wrong bearer beats right query",
        GUARDED,
        {"token": "s3cret"},
        {**GOOD_ORIGIN, "authorization": "Bearer wrong"},
        Refusal.AUTH,
    ),
    ("open gateway, anything goes", Settings(), {}, {"origin": "null"}, None),
    (
        "token only, any origin",
        Settings(auth_token="s3cret"),
        {"token": "s3cret"},
        {"origin": "https://evil.com"},
        None,
    ),
]


@pytest.mark.parametrize(
    ("settings", "query", "headers", "expected"),
    [(s, q, h, e) for _, s, q, h, e in REFUSALS],
    ids=[name for name, _, _, _, _ in REFUSALS],
)
def test_refusal_decides_origin_before_token(
    settings: Settings,
    query: dict[str, str],
    headers: dict[str, str],
    expected: Refusal | None,
) -> None:
    """A foreign Origin is refused first, then a missing or wrong token; else None (accept)."""
    assert refusal(settings, query, headers) is expected


def test_refusal_maps_to_http_status_and_metric_label() -> None:
    """Origin refusals are 403, auth refusals 401, and each value is a metric reason label."""
    assert Refusal.ORIGIN.status == 403
    assert Refusal.AUTH.status == 401
    assert {r.value for r in Refusal} <= set(REJECT_REASONS)


_hosts = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9-]{0,15}(\.[a-zA-Z][a-zA-Z0-9-]{0,15}){0,2}\Z")


@hypothesis.settings(max_examples=200, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "Https"]),
    host=_hosts,
    port=st.one_of(st.none(), st.integers(1, 65_535)),
    slash=st.booleans(),
)
def test_a_valid_origin_is_allowed_by_its_own_normal_form(
    scheme: str, host: str, port: int | None, slash: bool
) -> None:
    """Any well-formed origin is allowed by an allow-list holding its normalized form."""
    origin = f"{scheme}://{host}{'' if port is None else f':{port}'}{'/' if slash else ''}"
    assert origin_allowed(origin, frozenset({normalize_origin(origin)})) is True


@hypothesis.settings(max_examples=300, deadline=None)
@given(
    origin=st.one_of(
        st.text(max_size=40),
        st.builds(
            str.__add__,
            st.sampled_from(["http://", "https://", "null", "", "https://app.example.com"]),
            st.text(alphabet="[]:@/?#%.-_ aZ09\u0430\uff0f\uff0e\x00", max_size=20),
        ),
    )
)
def test_origin_check_never_raises(origin: str) -> None:
    """Whatever the Origin header holds, origin_allowed answers True or False, never raises."""
    assert origin_allowed(origin, ALLOWED) in (True, False)
