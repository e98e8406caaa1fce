"""Payload validation: a UTF-8 JSON object within the size limit passes through unchanged."""

from __future__ import annotations

import hypothesis
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.payload import InvalidPayload, validate

LIMIT = 1 << 20

REJECTED = {
    "empty": b"",
    "whitespace only": b"  \n",
    "not json": b"not json",
    "python dict repr": b"{'a': 1}",
    "unquoted key": b"{a:1}",
    "truncated object": b'{"a": 1',
    "truncated string": b'{"a": "x}',
    "string scalar": b'"just a string"',
    "number scalar": b"42",
    "true scalar": b"true",
    "null scalar": b"null",
    "array": b"[1, 2]",
    "array of objects": b'[{"a": 1}]',
    "empty array": b"[]",
    "invalid utf-8": b"\xff\xfe{}",
    "invalid utf-8 inside a string": b'{"a": "\xc3\x28"}',
    "overlong utf-8 slash": b'{"a": "\xc0\xaf"}',
    "utf-8 encoded surrogate": b'{"a": "\xed\xa0\x80"}',
    "utf-16 object": '{"a": 1}'.encode("utf-16"),
    "utf-8 bom": b'\xef\xbb\xbf{"a": 1}',
    "100k open brackets": b"[" * 100_000,
    "object nesting 100k arrays": b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "object nesting 50k objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "trailing garbage": b'{"a": 1} x',
    "two objects": b'{"a": 1}{"b": 2}',
    "trailing nul": b'{"a": 1}\x00',
    "NaN literal": b'{"a": NaN}',
    "Infinity literal": b'{"a": Infinity}',
    "leading zero": b'{"a": 01}',
    "bare minus": b'{"a": -}',
    "trailing dot": b'{"a": 1.}',
    "trailing comma in object": b'{"a": 1,}',
    "trailing comma in array": b'{"a": [1,]}',
    "raw control character in string": b'{"a": "\x01"}',
    "invalid escape": b'{"a": "\\x41"}',
    "short unicode escape": b'{"a": "\\u00"}',
    "lone surrogate key": b'{"\\ud800": 1}',
    "single quotes": b"{'a': 'b'}",
    "comment": b'{"a": 1 /* no */}',
}

ACCEPTED = {
    "empty object": b"{}",
    "compact object": b'{"a":1}',
    "spaced, unsorted keys": b'{ "b" : 1 , "a" : [1.50, "x"] }',
    "surrounding whitespace": b' \n\t{"a": 1}\r\n ',
    "unicode text": '{"ключ": "значение 🎉", "中文": "é"}'.encode(),
    "escapes": b'{"e": "\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83c\\udf89"}',
    "huge float": b'{"n": 1e400}',
    "huge negative exponent": b'{"n": -1e-400}',
    "huge integer": b'{"n": ' + b"9" * 5000 + b"}",
    "duplicate keys kept as sent": b'{"a": 1, "a": 2}',
    "nested 64 deep": b'{"a":' + b"[" * 64 + b"]" * 64 + b"}",
    "nul escaped in string": b'{"a": "\\u0000"}',
    "empty key": b'{"": null}',
}


@pytest.mark.parametrize("data", REJECTED.values(), ids=REJECTED.keys())
def test_bad_payload_is_rejected_with_invalid_payload(data: bytes) -> None:
    """Anything but a UTF-8 JSON object raises InvalidPayload (never another error)."""
    with pytest.raises(InvalidPayload) as caught:
        validate(data, LIMIT)
    assert str(caught.value), "the reason is stated"


@pytest.mark.parametrize("data", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_good_payload_is_returned_as_exactly_its_text(data: bytes) -> None:
    """A UTF-8 JSON object comes back as its text, re-encoding to the very same bytes."""
    text = validate(data, LIMIT)
    assert text == data.decode("utf-8")
    assert text.encode("utf-8") == data


def test_payload_at_the_limit_is_accepted_one_byte_over_is_rejected() -> None:
    """`max_bytes` is inclusive: a payload of exactly the limit passes, one more byte fails."""
    data = b'{"pad": "' + b"x" * 100 + b'"}'
    assert validate(data, len(data)) == data.decode()
    with pytest.raises(InvalidPayload, match="exceeds"):
        validate(data, len(data) - 1)


def test_size_limit_is_checked_in_bytes_not_characters() -> None:
    """The limit counts bytes: as many characters as the limit, but more bytes, is too big."""
    text = '{"a":"' + "é" * 10 + '"}'
    with pytest.raises(InvalidPayload, match="exceeds"):
        validate(text.encode(), len(text))


def test_oversize_payload_is_rejected_before_it_is_parsed() -> None:
    """An over-limit payload is refused for its size, even if it is not JSON at all."""
    with pytest.raises(InvalidPayload, match="exceeds"):
        validate(b"\xff" * 1000, 999)


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@hypothesis.settings(max_examples=100, deadline=None)
@given(doc=st.dictionaries(st.text(), _json_values, max_size=6))
def test_any_encoded_json_object_is_accepted_byte_identical(doc: dict[str, object]) -> None:
    """Every dict msgspec encodes is accepted and returned as exactly the encoded bytes."""
    data = msgspec.json.encode(doc)
    assert validate(data, LIMIT).encode("utf-8") == data


@hypothesis.settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=64),
        st.text(alphabet='{}[]":,0123456789.eE+-tfnrlsua\\ \x00\xff\u00e9', max_size=40).map(
            str.encode
        ),
        st.builds(bytes.__add__, st.just(b'{"k":'), st.binary(max_size=20)),
    )
)
def test_any_bytes_are_rejected_or_returned_unchanged(data: bytes) -> None:
    """Arbitrary bytes raise InvalidPayload or come back as text encoding to the same bytes."""
    try:
        text = validate(data, LIMIT)
    except InvalidPayload:
        return
    assert text.encode("utf-8") == data
    assert isinstance(msgspec.json.decode(data), dict), "only objects pass"
