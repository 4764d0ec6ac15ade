"""edge_agent.wire.fallback: round trips, caps, malformed messages, disagreement, schema."""

from __future__ import annotations

import json
import struct
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
import pytest

from edge_agent.errors import ContractError
from edge_agent.wire.fallback import (
    DTYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    FallbackRequest,
    FallbackResponse,
)
from edge_agent.wire.fallback_compare import compare_outputs


def _header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<I", data, 4)
    out: dict[str, Any] = json.loads(data[8 : 8 + n])
    return out


def _frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def _schema() -> dict[str, Any]:
    text = resources.files("edge_agent").joinpath("schemas/fallback-header.schema.json")
    schema: dict[str, Any] = json.loads(text.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


X = np.arange(12, dtype=np.float32).reshape(2, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_request_round_trip_every_dtype(dtype: str) -> None:
    arr = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    req = FallbackRequest(
        "digits", {"input": arr, "s": np.asarray(5, dtype)}, 120.0, "low_confidence"
    )
    back = FallbackRequest.from_bytes(req.to_bytes())
    assert back == back
    assert back.model == "digits"
    assert back.reason == "low_confidence"
    assert back.deadline_ms == 120.0
    np.testing.assert_array_equal(back.inputs["input"], arr)
    assert back.inputs["input"].dtype == np.dtype(dtype)
    assert back.inputs["s"].shape == ()
    back.inputs["input"][...] = 0  # a writable copy, not a view of the payload


def test_request_with_device_outputs_and_big_endian_input() -> None:
    be = X.astype(">f4")
    out = np.eye(2, 10, dtype=np.float32)
    req = FallbackRequest("m", {"input": be}, 50, device_outputs={"probabilities": out})
    back = FallbackRequest.from_bytes(req.to_bytes())
    np.testing.assert_array_equal(back.inputs["input"], X)
    np.testing.assert_array_equal(back.device_outputs["probabilities"], out)
    assert "device_outputs" in _header(req.to_bytes())


def test_response_round_trips_ok_and_error() -> None:
    ok = FallbackResponse("digits", "3", {"probabilities": X}, compute_ms=0.25)
    back = FallbackResponse.from_bytes(ok.to_bytes())
    assert back.ok
    assert back.model_version == "3"
    assert back.compute_ms == 0.25
    np.testing.assert_array_equal(back.outputs["probabilities"], X)
    err = FallbackResponse.from_bytes(
        FallbackResponse.failure("d", "overloaded", "x" * 999).to_bytes()
    )
    assert not err.ok
    assert err.error_code == "overloaded"
    assert len(err.error_message) == 512


def test_headers_match_the_published_schema() -> None:
    schema = _schema()
    req = FallbackRequest("m", {"a": X}, 10, device_outputs={"o": X})
    for msg in (
        req.to_bytes(),
        FallbackResponse("m", "1", {"o": X}).to_bytes(),
        FallbackResponse.failure("m", "bad_request", "no").to_bytes(),
    ):
        jsonschema.validate(_header(msg), schema)
    bad = _header(req.to_bytes()) | {"extra": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


GOOD = FallbackRequest("m", {"a": X}, 10).to_bytes()
GOOD_HEADER = _header(GOOD)
BODY = X.tobytes()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "shorter"),
        (b"XXXX" + GOOD[4:], "magic"),
        (MAGIC + struct.pack("<I", 10**6) + b"{}", "header length"),
        (MAGIC + struct.pack("<I", 3) + b"{{{", "not JSON"),
        (_frame({**GOOD_HEADER, "schema_version": 2}, BODY), "schema_version"),
        (_frame({**GOOD_HEADER, "kind": "response"}, BODY), "expected a request"),
        (_frame({**GOOD_HEADER, "extra": 1}, BODY), "unknown fields"),
        (_frame({k: v for k, v in GOOD_HEADER.items() if k != "model"}, BODY), "lacks"),
        (_frame(GOOD_HEADER, BODY[:-1]), "too short"),
        (_frame(GOOD_HEADER, BODY + b"\0"), "after the last tensor"),
        (_frame({**GOOD_HEADER, "deadline_ms": -1}, BODY), "deadline_ms"),
        (_frame({**GOOD_HEADER, "deadline_ms": True}, BODY), "deadline_ms"),
        (_frame({**GOOD_HEADER, "deadline_ms": 1e9}, BODY), "deadline_ms"),
        (MAGIC + GOOD[4:].replace(b'"deadline_ms":10', b'"deadline_ms":NaN'), "JSON|non-finite"),
        (_frame({**GOOD_HEADER, "model": ""}, BODY), "model"),
        (_frame({**GOOD_HEADER, "inputs": []}), "at least one input"),
        (
            _frame({**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "object", "shape": [1]}]}),
            "dtype",
        ),
        (_frame({**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "<f4", "shape": [1]}]}), "dtype"),
        (
            _frame({**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "uint8", "shape": [-1]}]}),
            "size",
        ),
        (
            _frame({**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "uint8", "shape": [1] * 9}]}),
            "shape",
        ),
        (
            _frame(
                {**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "uint8", "shape": [1]}] * 2},
                b"ab",
            ),
            "repeats",
        ),
        (
            _frame({**GOOD_HEADER, "inputs": [{"name": "a", "dtype": "uint8", "shape": [1]}] * 33}),
            "at most",
        ),
        (
            _frame(
                {
                    **GOOD_HEADER,
                    "inputs": [{"name": "a", "dtype": "float64", "shape": [10**6, 10**6]}],
                }
            ),
            "too short",
        ),
        (_frame([1, 2]), "object"),  # type: ignore[arg-type]
    ],
)
def test_malformed_requests_raise_contract_errors(payload: bytes, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        FallbackRequest.from_bytes(payload)


def test_malformed_responses() -> None:
    ok = _header(FallbackResponse("m", "1", {"o": X}).to_bytes())
    with pytest.raises(ContractError, match="error code"):
        FallbackResponse.from_bytes(
            _frame({**ok, "outputs": [], "error": {"code": "weird", "message": ""}})
        )
    with pytest.raises(ContractError, match="no outputs"):
        FallbackResponse.from_bytes(
            _frame({**ok, "error": {"code": "internal", "message": ""}}, BODY)
        )
    with pytest.raises(ContractError, match="expected a response"):
        FallbackResponse.from_bytes(GOOD)


def test_size_caps_on_build_and_parse() -> None:
    big = np.zeros(MAX_MESSAGE_BYTES // 4 + 1, np.float32)
    with pytest.raises(ContractError, match="exceeds"):
        FallbackRequest("m", {"a": big}, 10).to_bytes()
    with pytest.raises(ContractError, match="exceeds"):
        FallbackRequest.from_bytes(GOOD + b"\0" * MAX_MESSAGE_BYTES)
    many = {f"t{'x' * 100}{i}": np.zeros(1, np.uint8) for i in range(32)}
    many_long = {k * 1: v for k, v in many.items()}
    msg = FallbackRequest("m", many_long, 10, device_outputs=many_long).to_bytes()
    assert len(_header(msg)["inputs"]) == 32
    assert len(msg) < MAX_HEADER_BYTES + 200
    with pytest.raises(ContractError, match="at most"):
        FallbackRequest("m", {**many, "one_more": np.zeros(1)}, 10)


def test_constructor_rejects_bad_values() -> None:
    with pytest.raises(ContractError, match="dtype"):
        FallbackRequest("m", {"a": np.array(["s"])}, 10)
    with pytest.raises(ContractError, match="deadline"):
        FallbackRequest("m", {"a": X}, 0)
    with pytest.raises(ContractError, match="no outputs"):
        FallbackResponse("m", "1", {"o": X}, error_code="internal")
    with pytest.raises(ContractError, match="error code"):
        FallbackResponse.failure("m", "nope", "")


def test_compare_outputs_by_argmax_and_tolerance() -> None:
    dev = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]], np.float32)
    cloud = np.array([[0.8, 0.2], [0.7, 0.3], [np.nan, 1.0]], np.float32)
    c = compare_outputs({"p": dev}, {"p": cloud})
    assert (c.rows, c.disagree_rows, c.comparable) == (3, 2, True)
    reg = compare_outputs({"y": np.array([[1.0], [2.0]])}, {"y": np.array([[1.01], [3.0]])})
    assert (reg.rows, reg.disagree_rows) == (2, 1)
    assert not compare_outputs({"p": dev}, {"q": dev}).comparable
    assert not compare_outputs({"p": dev}, {"p": dev[:2]}).comparable
    assert compare_outputs({"p": dev}, {"p": dev}).disagree_rows == 0
