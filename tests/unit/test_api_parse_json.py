"""The v2 API's JSON through orjson means the same as through ``json``: ``decode.parse_json`` is
``json.loads`` (the same value, same types and float bits, or the same error, whichever parser
answers), and ``codec.encode_response`` writes the same JSON values as with ``json`` alone
(NaN/Infinity tokens included), whatever the outputs and parameters."""

from __future__ import annotations

import functools
import json
import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.api import codec
from edge_agent.api.decode import FAST_JSON_BYTES, decode_request, parse_json
from edge_agent.errors import InputValidationError
from edge_agent.serving.service import InferenceResult


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


# --- responses: encode_response writes the same JSON values through orjson as through json ---

OUTPUTS: dict[str, np.ndarray] = {
    "fp32": (np.arange(12, dtype=np.float32) - 5.5).reshape(3, 4) * np.float32(1e-7),
    "fp64 extremes": np.array([5e-324, 1.7976931348623157e308, -0.0, 1e16, 1.5e-5]),
    "fp16": np.array([0.1, 65504], np.float16),
    "int64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
    "uint64": np.array([np.iinfo(np.uint64).max], np.uint64),
    "bool": np.array([True, False]),
    "bytes": np.array(["é\U0001f600", "ab"], dtype=object),
    "nan": np.array([1.0, np.nan, np.inf, -np.inf], np.float32),
}
PARAMETERS: dict[str, dict[str, Any]] = {
    "none": {},
    "plain nested": {"flags": {"a": [1, 2.5, None, True]}, "note": "é"},
    "numpy values": {"drift_alert": np.bool_(True), "score": np.float32(0.25)},
    "nan": {"score": float("nan")},
    "beyond 64 bits": {"n": 2**70},
    "lone surrogate": {"s": "\ud800"},
    "set and bytes": {"s": {1}, "b": b"\xff"},
    "deep": {"d": functools.reduce(lambda acc, _: {"x": acc}, range(20), {})},
}


def _reference(monkeypatch: pytest.MonkeyPatch, res: InferenceResult, **kw: Any) -> bytes:
    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise orjson.JSONEncodeError("forced")

    with monkeypatch.context() as m:
        m.setattr(orjson, "dumps", refuse)  # encode_response falls back to json: the old path
        return codec.encode_response(res, **kw).body


def _values(text: bytes) -> str:
    """The JSON values of ``text``, in one canonical text (NaN and Infinity tokens included)."""
    return json.dumps(json.loads(text), sort_keys=True)


@pytest.mark.parametrize("params", list(PARAMETERS))
@pytest.mark.parametrize("output", list(OUTPUTS))
def test_response_json_values_are_json_s(
    monkeypatch: pytest.MonkeyPatch, output: str, params: str
) -> None:
    res = InferenceResult(
        model="m",
        model_version="3",
        outputs={output: OUTPUTS[output]},
        source="device",
        parameters=PARAMETERS[params],
    )
    got = codec.encode_response(res, request_id="r-\u00e9").body
    assert _values(got) == _values(_reference(monkeypatch, res, request_id="r-\u00e9"))
    if output == "nan" or params == "nan":
        assert b"NaN" in got  # the NaN policy's tokens, never orjson's null
    assert b"null" not in got or params == "plain nested"


def test_a_lone_surrogate_id_falls_back_to_json(monkeypatch: pytest.MonkeyPatch) -> None:
    res = InferenceResult(
        model="m", model_version="3", outputs={"y": OUTPUTS["fp32"]}, source="device"
    )
    got = codec.encode_response(res, request_id="\ud800").body
    assert got == _reference(monkeypatch, res, request_id="\ud800")


def test_plain_finite_answers_take_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    dumps = orjson.dumps

    def spy(value: Any, *args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(orjson, "dumps", spy)
    for output, params, fast in (
        ("fp32", "plain nested", True),
        ("nan", "none", False),
        ("fp32", "numpy values", False),
    ):
        res = InferenceResult(
            model="m",
            model_version="3",
            outputs={output: OUTPUTS[output]},
            source="device",
            parameters=PARAMETERS[params],
        )
        calls.clear()
        codec.encode_response(res)
        assert bool(calls) == fast, (output, params)
