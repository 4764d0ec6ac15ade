"""``edge_agent.api.decode.parse_json`` is ``json.loads``: the same value (same types, same float
bits) or the same error, whichever parser answers; a request decodes as it did with ``json``."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.api.decode import FAST_JSON_BYTES, decode_request, parse_json
from edge_agent.errors import InputValidationError


def outcome(parse: Any, text: bytes) -> tuple[str, Any]:
    """('ok', a repr that tells int from float and -0.0 from 0.0) or ('error', its type)."""
    try:
        return "ok", repr(parse(text))
    except RecursionError:
        return "error", "RecursionError"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        return "error", type(exc).__name__


TEXTS = [
    b'{"inputs": [{"name": "x", "data": [1, 2.5, -0.0, 1e-7, 3E+2]}]}',
    b"[18446744073709551615]",  # the largest uint64: an int for both parsers
    b"[18446744073709551616]",  # past 64 bits: orjson makes a float, json an int
    b"[-9223372036854775809]",
    b"[123456789012345678901234567890]",
    b"[0.1234567890123456789012]",
    b"[1e400]",  # past the float range: json says inf, orjson refuses
    b"[-1e400, 1e-400]",
    b"[NaN, Infinity, -Infinity]",
    b'["\\ud800"]',  # a lone surrogate, escaped
    b'["\xed\xa0\x80"]',  # ... and raw
    b'["\xff"]',  # not UTF-8
    b"\xef\xbb\xbf[1]",  # a byte order mark
    '[1, "é"]'.encode("utf-16"),
    '{"a": 1}'.encode("utf-32-le"),
    b'{"a": 1, "a": 2}',
    b"[1, 2,]",
    b"[01]",
    b'"a\x01b"',
    b"[1]\x00",
    b"",
    b"[" * 5000 + b"]" * 5000,  # nesting deeper than either parser goes
    b"[true, false, null]",
    b'"\\u0000\\/\\n"',
]


@pytest.mark.parametrize("text", TEXTS, ids=[repr(t[:24]) for t in TEXTS])
def test_same_value_or_error_as_json(text: bytes) -> None:
    assert outcome(parse_json, text) == outcome(json.loads, text)


def test_float_bits_are_json_s() -> None:
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**64, size=20_000, dtype=np.uint64)
    doubles = [x for x in bits.view(np.float64).tolist() if math.isfinite(x)]
    singles = (rng.random(20_000) * 16).astype(np.float32).tolist()
    texts = [repr(x) for x in doubles] + [f"{x:.9g}" for x in doubles] + [repr(x) for x in singles]
    chunks: list[list[str]] = [[]]
    size = 2
    for t in texts:  # arrays small enough for the fast parser
        if size + len(t) + 1 > FAST_JSON_BYTES:
            chunks.append([])
            size = 2
        chunks[-1].append(t)
        size += len(t) + 1
    assert len(chunks) > 1
    for chunk in chunks:
        text = ("[" + ",".join(chunk) + "]").encode()
        fast, slow = parse_json(text), json.loads(text)
        assert struct.pack(f"<{len(fast)}d", *fast) == struct.pack(f"<{len(slow)}d", *slow)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_json_document_parses_as_json_does(value: Any) -> None:
    text = json.dumps(value).encode()
    assert outcome(parse_json, text) == outcome(json.loads, text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_fail_as_json_does(text: bytes) -> None:
    assert outcome(parse_json, text) == outcome(json.loads, text)


def test_an_integer_past_64_bits_is_still_refused_in_a_float_tensor() -> None:
    data = b'"data": [1, 18446744073709551616]'
    body = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", ' + data + b"}]}"
    with pytest.raises(InputValidationError) as info:
        decode_request(body)
    assert info.value.reason == "data"
    assert "integers beyond 64 bits" in str(info.value)


def test_small_texts_take_the_fast_parser_large_ones_json(monkeypatch: pytest.MonkeyPatch) -> None:
    import orjson

    from edge_agent.api import decode

    fast: list[int] = []
    loads = orjson.loads

    def spy(text: bytes) -> Any:
        fast.append(len(text))
        return loads(text)

    monkeypatch.setattr(decode.orjson, "loads", spy)
    small = b"[" + b"0.5," * 100 + b"1]"
    large = b"[" + b"0.5," * (FAST_JSON_BYTES // 4) + b"1]"
    assert parse_json(small) == json.loads(small)
    assert parse_json(large) == json.loads(large)
    assert parse_json(b"[12345678901234567890]") == [12345678901234567890]
    assert fast == [len(small)]  # not the large text, not the one with a 20-digit number
