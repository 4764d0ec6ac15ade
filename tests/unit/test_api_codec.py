"""The v2 tensor codec: JSON and binary round trips, and every malformed body refused by reason."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from edge_agent.api import codec
from edge_agent.api.decode import RequestedOutput, decode_request
from edge_agent.errors import InferenceError, InputValidationError
from edge_agent.serving.service import InferenceResult

NUMERIC = [
    ("BOOL", np.bool_),
    ("UINT8", np.uint8),
    ("UINT16", np.uint16),
    ("UINT32", np.uint32),
    ("UINT64", np.uint64),
    ("INT8", np.int8),
    ("INT16", np.int16),
    ("INT32", np.int32),
    ("INT64", np.int64),
    ("FP16", np.float16),
    ("FP32", np.float32),
    ("FP64", np.float64),
]


def sample(dtype: Any, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    count = math.prod(shape)
    if dtype is np.bool_:
        return (np.arange(count) % 2 == 0).reshape(shape)
    kind = np.dtype(dtype).kind
    if kind == "u":  # the top of the range, beyond what a signed type holds
        return (dtype(np.iinfo(dtype).max) - np.arange(count, dtype=dtype)).reshape(shape)
    values = np.arange(count) * 1.5 - 2.0 if kind == "f" else np.arange(count) - 2
    return values.astype(dtype).reshape(shape)


def tensor(name: str, datatype: str, shape: list[int], data: Any = None, **params: Any) -> dict:
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        out["data"] = data
    if params:
        out["parameters"] = params
    return out


def body(doc: Any, *chunks: bytes) -> tuple[bytes, str | None]:
    header = json.dumps(doc).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), str(len(header))


def split(encoded: codec.EncodedResponse) -> tuple[dict[str, Any], bytes]:
    if encoded.header_length is None:
        return json.loads(encoded.body), b""
    n = encoded.header_length
    return json.loads(encoded.body[:n]), encoded.body[n:]


def result(outputs: dict[str, Any], **parameters: Any) -> InferenceResult:
    return InferenceResult(
        model="m", model_version="3", outputs=outputs, source="cloud", parameters=parameters
    )


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(("datatype", "dtype"), NUMERIC)
@pytest.mark.parametrize("nested", [True, False])
def test_json_input_every_datatype_flat_or_nested(datatype: str, dtype: Any, nested: bool) -> None:
    expected = sample(dtype)
    data = expected.tolist() if nested else expected.reshape(-1).tolist()
    raw, _ = body({"inputs": [tensor("x", datatype, [2, 3], data)]})
    decoded = decode_request(raw)
    got = decoded.inputs["x"]
    assert got.dtype == np.dtype(dtype)
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("datatype", "dtype"), NUMERIC)
def test_binary_input_every_datatype_is_a_read_only_view(datatype: str, dtype: Any) -> None:
    expected = sample(dtype)
    raw_bytes = expected.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    doc = {"inputs": [tensor("x", datatype, [2, 3], binary_data_size=len(raw_bytes))]}
    raw, header = body(doc, raw_bytes)
    got = decode_request(raw, header).inputs["x"]
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)
    assert not got.flags.writeable  # a view of the body, not a copy


@pytest.mark.parametrize(("datatype", "dtype"), NUMERIC)
def test_outputs_every_datatype_json_and_binary(datatype: str, dtype: Any) -> None:
    array = sample(dtype)
    doc, rest = split(codec.encode_response(result({"y": array})))
    assert doc["outputs"] == [
        {"name": "y", "datatype": datatype, "shape": [2, 3], "data": array.reshape(-1).tolist()}
    ]
    assert rest == b""
    doc, rest = split(codec.encode_response(result({"y": array}), binary_output=True))
    (out,) = doc["outputs"]
    assert out["datatype"] == datatype
    assert "data" not in out
    assert out["parameters"]["binary_data_size"] == len(rest) == array.nbytes
    back = np.frombuffer(rest, dtype=np.dtype(dtype).newbyteorder("<")).reshape(out["shape"])
    np.testing.assert_array_equal(back, array)


def test_mixed_binary_and_json_inputs_in_order() -> None:
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    c = np.array([7, 8, 9], dtype=np.int64)
    doc = {
        "inputs": [
            tensor("a", "FP32", [2, 2], binary_data_size=a.nbytes),
            tensor("b", "INT32", [3], [1, 2, 3]),
            tensor("c", "INT64", [3], binary_data_size=c.nbytes),
        ]
    }
    raw, header = body(doc, a.tobytes(), c.tobytes())
    inputs = decode_request(raw, header).inputs
    np.testing.assert_array_equal(inputs["a"], a)
    np.testing.assert_array_equal(inputs["b"], [1, 2, 3])
    np.testing.assert_array_equal(inputs["c"], c)


def test_bytes_inputs_json_and_binary() -> None:
    elements = [b"hello", b"", "h\u00e9".encode()]
    blob = packed(*elements)
    doc = {
        "inputs": [
            tensor("j", "BYTES", [3], ["hello", "", "h\u00e9"]),
            tensor("b", "BYTES", [1, 3], binary_data_size=len(blob)),
        ]
    }
    raw, header = body(doc, blob)
    inputs = decode_request(raw, header).inputs
    assert inputs["j"].tolist() == elements
    assert inputs["b"].shape == (1, 3)
    assert inputs["b"].reshape(-1).tolist() == elements


def test_bytes_outputs_json_when_text_binary_when_not() -> None:
    text = np.array([b"ab", b"c"], dtype=object)
    doc, rest = split(codec.encode_response(result({"t": text})))
    assert doc["outputs"][0] == {
        "name": "t",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["ab", "c"],
    }
    assert rest == b""
    raw = np.array([b"\xff\x00"], dtype=object)
    doc, rest = split(codec.encode_response(result({"r": raw})))
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 6}
    assert rest == b"\x02\x00\x00\x00\xff\x00"


def test_requested_outputs_pick_order_and_per_output_binary() -> None:
    outputs = {"p": np.array([0.25, 0.75], dtype=np.float32), "k": np.array([1], dtype=np.int64)}
    wanted = (RequestedOutput("k"), RequestedOutput("p", binary=True))
    doc, rest = split(codec.encode_response(result(outputs), outputs=wanted))
    assert [o["name"] for o in doc["outputs"]] == ["k", "p"]
    assert doc["outputs"][0]["data"] == [1]
    assert np.frombuffer(rest, "<f4").tolist() == [0.25, 0.75]
    # the request-wide flag, overridden per output
    wanted = (RequestedOutput("p", binary=False),)
    doc, rest = split(codec.encode_response(result(outputs), outputs=wanted, binary_output=True))
    assert doc["outputs"][0]["data"] == [0.25, 0.75]
    assert rest == b""


def test_unknown_requested_output_is_a_validation_error() -> None:
    with pytest.raises(InputValidationError) as info:
        codec.encode_response(result({"p": np.zeros(1)}), outputs=(RequestedOutput("q"),))
    assert (info.value.reason, info.value.field) == ("output", "q")


def test_output_dtype_without_v2_datatype_raises_inference_error() -> None:
    with pytest.raises(InferenceError):
        codec.encode_response(result({"z": np.zeros(2, dtype=np.complex64)}))


def test_response_fields_parameters_and_id() -> None:
    res = result({"y": np.zeros(1, np.float32)}, drift_alert=np.bool_(True), dropped={"nan": 2})
    doc, _ = split(codec.encode_response(res, request_id="req-7"))
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "3"
    assert doc["id"] == "req-7"
    assert doc["parameters"] == {
        "drift_alert": True,
        "dropped": {"nan": 2},
        "model_version": "3",
        "inference_source": "cloud",
    }
    doc, _ = split(codec.encode_response(res))
    assert "id" not in doc


def test_decoded_request_fields() -> None:
    doc = {
        "id": "abc",
        "parameters": {"binary_data_output": True, "routing_key": "user-1"},
        "inputs": [tensor("x", "FP32", [1], [1.0])],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    }
    decoded = decode_request(body(doc)[0])
    assert decoded.request_id == "abc"
    assert decoded.binary_output is True
    assert decoded.parameters["routing_key"] == "user-1"
    assert decoded.outputs == (RequestedOutput("y", False), RequestedOutput("z", None))


# --- NaN policy ----------------------------------------------------------------------------


def test_nan_and_infinity_tokens_pass_through_fp_tensors() -> None:
    raw = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[NaN,Infinity,-Infinity]}]}'
    x = decode_request(raw).inputs["x"]
    assert np.isnan(x[0])
    assert x[1] == np.inf
    assert x[2] == -np.inf


def test_nan_token_in_integer_tensor_is_refused() -> None:
    raw = b'{"inputs":[{"name":"x","datatype":"INT32","shape":[2],"data":[1,NaN]}]}'
    with pytest.raises(InputValidationError) as info:
        decode_request(raw)
    assert (info.value.reason, info.value.field) == ("data", "x")


def test_nan_outputs_are_written_as_tokens() -> None:
    encoded = codec.encode_response(result({"y": np.array([np.nan, np.inf], dtype=np.float32)}))
    assert b'"data":[NaN,Infinity]' in encoded.body


def test_fp64_values_beyond_fp32_become_infinity_not_an_error() -> None:
    raw, _ = body({"inputs": [tensor("x", "FP32", [1], [1e300])]})
    assert decode_request(raw).inputs["x"][0] == np.inf


# --- malformed bodies -----------------------------------------------------------------------


def _case(doc: Any, *chunks: bytes, header: str | None = None) -> tuple[bytes, str | None]:
    raw, computed = body(doc, *chunks)
    return raw, header if header is not None else computed


def one(datatype: Any, shape: Any, data: Any = None, *chunks: bytes, **params: Any) -> Any:
    """A request with the single input ``x``; binary ``chunks`` follow the JSON."""
    return _case({"inputs": [tensor("x", datatype, shape, data, **params)]}, *chunks)


def valid_with(header: str | None = None, **doc: Any) -> Any:
    """A valid single input plus top-level fields ``doc``."""
    return _case({**doc, "inputs": [tensor("x", "FP32", [1], [1])]}, header=header)


def packed(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


F4 = np.zeros(2, np.float32).tobytes()
SHORT = (5).to_bytes(4, "little") + b"abc"  # says 5 bytes, has 3
SIXTY_FIVE = [tensor(f"x{i}", "FP32", [1], [1]) for i in range(65)]
NO_HEADER = json.dumps({"inputs": [tensor("x", "FP32", [2], binary_data_size=8)]}).encode() + F4

BAD: list[tuple[str, tuple[bytes, str | None], str, str | None]] = [
    ("not json", (b"{", None), "json", None),
    ("not utf-8", (b"\xff\xfe\xfd", None), "json", None),
    ("too deep", (b"[" * 200_000, None), "json", None),
    ("top level array", _case([]), "json", None),
    ("no inputs", _case({}), "schema", None),
    ("empty inputs", _case({"inputs": []}), "schema", None),
    ("inputs not a list", _case({"inputs": {"x": 1}}), "schema", None),
    ("input not an object", _case({"inputs": [5]}), "schema", None),
    ("input without name", _case({"inputs": [{"datatype": "FP32", "shape": [1]}]}), "schema", None),
    ("datatype not a string", one(5, [1], [1]), "schema", "x"),
    ("unknown datatype", one("FLOAT32", [1], [1]), "datatype", "x"),
    ("lowercase datatype", one("fp32", [1], [1]), "datatype", "x"),
    ("BF16", one("BF16", [1], [1.0]), "datatype", "x"),
    ("shape not a list", one("FP32", 2, [1, 2]), "shape", "x"),
    ("negative dim", one("FP32", [-1], [1]), "shape", "x"),
    ("bool dim", one("FP32", [True], [1]), "shape", "x"),
    ("float dim", one("FP32", [1.0], [1]), "shape", "x"),
    ("rank 33", one("FP32", [1] * 33, [1]), "shape", "x"),
    ("data not a list", one("FP32", [1], 5), "data", "x"),
    ("data missing", one("FP32", [1]), "schema", "x"),
    ("length mismatch", one("FP32", [3], [1, 2]), "shape", "x"),
    ("nested too deep", one("FP32", [2, 2], [[[1], [2]], [[3], [4]]]), "shape", "x"),
    ("nested wrong shape", one("FP32", [2, 2], [[1, 2, 3, 4]]), "shape", "x"),
    ("ragged", one("FP32", [2, 2], [[1, 2], [3]]), "shape", "x"),
    ("strings in FP32", one("FP32", [2], ["1", "2"]), "data", "x"),
    ("null in FP32", one("FP32", [2], [1.0, None]), "data", "x"),
    ("booleans in FP32", one("FP32", [2], [True, False]), "data", "x"),
    ("object in FP32", one("FP32", [1], [{"a": 1}]), "data", "x"),
    ("float in INT32", one("INT32", [2], [1, 2.5]), "data", "x"),
    ("INT8 out of range", one("INT8", [2], [1, 300]), "data", "x"),
    ("negative UINT8", one("UINT8", [1], [-1]), "data", "x"),
    ("beyond 64 bits", one("INT64", [1], [2**70]), "data", "x"),
    ("ints in BOOL", one("BOOL", [2], [0, 1]), "data", "x"),
    ("numbers in BYTES", one("BYTES", [2], [1, 2]), "data", "x"),
    ("65 inputs", _case({"inputs": SIXTY_FIVE}), "too_many_inputs", None),
    ("duplicate input", _case({"inputs": [tensor("x", "FP32", [1], [1])] * 2}), "schema", "x"),
    ("id not a string", valid_with(id=5), "schema", None),
    ("parameters not an object", valid_with(parameters=[1]), "schema", None),
    (
        "binary_data_output not bool",
        valid_with(parameters={"binary_data_output": 1}),
        "schema",
        None,
    ),
    ("outputs not a list", valid_with(outputs={"y": 1}), "schema", None),
    ("output without name", valid_with(outputs=[{}]), "schema", None),
    (
        "binary_data not bool",
        valid_with(outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
        "schema",
        "y",
    ),
    ("binary without header", (NO_HEADER, None), "json", None),
    ("binary declared, none sent", one("FP32", [2], binary_data_size=8), "binary_size", "x"),
    ("binary size vs shape", one("FP32", [3], None, F4, binary_data_size=8), "binary_size", "x"),
    ("binary size not int", one("FP32", [2], None, F4, binary_data_size="8"), "binary_size", "x"),
    ("binary size negative", one("FP32", [2], None, F4, binary_data_size=-8), "binary_size", "x"),
    ("binary and data", one("FP32", [2], [1, 2], F4, binary_data_size=8), "schema", "x"),
    ("trailing bytes", one("FP32", [2], None, F4, b"\0", binary_data_size=8), "binary_size", None),
    ("header not a number", valid_with(header="ten"), "binary_size", None),
    ("header beyond body", valid_with(header="100000"), "binary_size", None),
    ("header huge", valid_with(header="9" * 5000), "binary_size", None),
    ("header cuts the JSON", valid_with(header="10"), "json", None),
    ("BOOL byte 2", one("BOOL", [2], None, b"\1\2", binary_data_size=2), "data", "x"),
    ("BYTES truncated", one("BYTES", [1], None, SHORT, binary_data_size=7), "binary_size", "x"),
    (
        "BYTES huge shape",
        one("BYTES", [10**9], None, SHORT, binary_data_size=7),
        "binary_size",
        "x",
    ),
    (
        "BYTES too few",
        one("BYTES", [2], None, packed(b"abc"), binary_data_size=7),
        "binary_size",
        "x",
    ),
]


@pytest.mark.parametrize(("raw", "reason", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed_request_is_refused_with_reason(
    raw: tuple[bytes, str | None], reason: str, field: str | None
) -> None:
    with pytest.raises(InputValidationError) as info:
        decode_request(*raw)
    assert info.value.reason == reason, str(info.value)
    assert info.value.field == field
    assert str(info.value)


def test_empty_tensor_is_fine() -> None:
    raw, _ = body({"inputs": [tensor("x", "INT32", [0, 4], [])]})
    assert decode_request(raw).inputs["x"].shape == (0, 4)


def test_scalar_tensor() -> None:
    raw, _ = body({"inputs": [tensor("x", "FP64", [], [2.5])]})
    x = decode_request(raw).inputs["x"]
    assert x.shape == ()
    assert x == 2.5
