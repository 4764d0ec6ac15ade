"""The gRPC codec: every datatype typed and raw, hostile requests get a typed error (table and
property), responses decode back to the service's arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.api.grpc_v2.codec import CONTENTS_FIELD, decode_infer, encode_infer
from edge_agent.api.grpc_v2.messages import METHODS, message_class
from edge_agent.errors import InferenceError, InputValidationError
from edge_agent.serving.service import InferenceResult

Request = message_class("ModelInferRequest")
WIRE = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([b"a", b"", b"\xff\x00", b"dd", b"e", b"f"][: int(np.prod(shape))],
                        dtype=object).reshape(shape)  # fmt: skip
    dtype = np.dtype(WIRE[datatype])
    if dtype.kind == "b":
        return (np.arange(np.prod(shape)) % 2 == 0).reshape(shape)
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    values = np.array([0, 1, info.max, info.min, 7, 3], dtype=dtype)
    return values[: int(np.prod(shape))].reshape(shape)


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=WIRE[datatype]).tobytes()


def request(datatype: str, array: np.ndarray, *, raw: bool, name: str = "x") -> Any:
    req = Request(model_name="m", id="i")
    tensor = req.inputs.add(name=name, datatype=datatype, shape=array.shape)
    if raw:
        req.raw_input_contents.append(raw_bytes(array, datatype))
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return req


@pytest.mark.parametrize(
    ("datatype", "raw"),
    # FP16 travels raw only (its typed form is refused, see HOSTILE)
    [(dt, raw) for dt in [*WIRE, "BYTES"] for raw in (False, True) if raw or dt != "FP16"],
)
def test_every_datatype_decodes(datatype: str, raw: bool) -> None:
    array = sample(datatype)
    decoded = decode_infer(request(datatype, array, raw=raw))
    got = decoded.inputs["x"]
    assert got.shape == array.shape
    if datatype == "BYTES":
        assert got.tolist() == array.tolist()
    else:
        assert got.dtype == np.dtype(WIRE[datatype]).newbyteorder("=")
        np.testing.assert_array_equal(got, array)
    assert decoded.request_id == "i"


def with_(req: Any, change: Any) -> Any:
    change(req)
    return req


def fp32(shape: tuple[int, ...] = (2, 2), raw: bool = False) -> Any:
    return request("FP32", np.ones(shape, np.float32), raw=raw)


HUGE = [2**31 - 1] * 4
HOSTILE: dict[str, tuple[Any, str]] = {
    "no inputs": (Request(model_name="m"), "schema"),
    "too many inputs": (
        with_(
            Request(), lambda r: [r.inputs.add(name=f"i{k}", datatype="FP32") for k in range(65)]
        ),
        "too_many_inputs",
    ),
    "empty name": (with_(fp32(), lambda r: setattr(r.inputs[0], "name", "")), "schema"),
    "duplicate name": (
        with_(fp32(), lambda r: r.inputs.add().CopyFrom(r.inputs[0])),
        "schema",
    ),
    "negative dim": (with_(fp32(), lambda r: r.inputs[0].shape.append(-1)), "shape"),
    "rank 33": (with_(fp32(), lambda r: r.inputs[0].shape.extend([1] * 31)), "shape"),
    "dim over 2**31-1": (with_(fp32(), lambda r: r.inputs[0].shape.append(2**31)), "shape"),
    "huge dims, typed": (
        with_(fp32(), lambda r: r.inputs[0].shape.extend(HUGE)),
        "shape",
    ),
    "zero elements, huge span": (
        with_(fp32(raw=True), lambda r: r.inputs[0].shape.extend([0, 41409, 14920639, 14928204])),
        "shape",
    ),
    "huge dims, raw": (
        with_(fp32(raw=True), lambda r: r.inputs[0].shape.extend(HUGE)),
        "binary_size",
    ),
    "huge dims, raw BYTES": (
        with_(
            fp32(raw=True),
            lambda r: (setattr(r.inputs[0], "datatype", "BYTES"), r.inputs[0].shape.extend(HUGE)),
        ),
        "binary_size",
    ),
    "raw too short": (
        with_(fp32(raw=True), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 15)),
        "binary_size",
    ),
    "raw too long": (
        with_(fp32(raw=True), lambda r: r.raw_input_contents.append(b"")),
        "binary_size",
    ),
    "raw and typed together": (
        with_(fp32(raw=True), lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
        "schema",
    ),
    "typed element count": (
        with_(fp32(), lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
        "shape",
    ),
    "contents of another datatype": (
        with_(fp32(), lambda r: r.inputs[0].contents.int_contents.append(1)),
        "data",
    ),
    "typed datatype mismatch": (
        with_(fp32(), lambda r: setattr(r.inputs[0], "datatype", "INT32")),
        "data",
    ),
    "unknown datatype": (
        with_(fp32(), lambda r: setattr(r.inputs[0], "datatype", "FP8")),
        "datatype",
    ),
    "BF16": (with_(fp32(raw=True), lambda r: setattr(r.inputs[0], "datatype", "BF16")), "datatype"),
    "FP16 typed": (with_(fp32(), lambda r: setattr(r.inputs[0], "datatype", "FP16")), "datatype"),
    "INT8 out of range": (request("INT8", np.array([300, 1]), raw=False), "data"),
    "UINT16 out of range": (request("UINT16", np.array([70000]), raw=False), "data"),
    "BOOL byte 2": (
        with_(
            request("BOOL", np.array([True]), raw=True),
            lambda r: r.raw_input_contents.__setitem__(0, b"\x02"),
        ),
        "data",
    ),
    "BYTES length prefix past the end": (
        with_(
            request("BYTES", np.array([b"ab"], dtype=object), raw=True),
            lambda r: r.raw_input_contents.__setitem__(0, b"\xff\xff\xff\x7fab"),
        ),
        "binary_size",
    ),
    "requested output without a name": (
        with_(fp32(), lambda r: r.outputs.add()),
        "schema",
    ),
}


@pytest.mark.parametrize("label", list(HOSTILE))
def test_hostile_requests_get_a_typed_error(label: str) -> None:
    req, reason = HOSTILE[label]
    again = Request.FromString(req.SerializeToString())  # as it arrives off the wire
    with pytest.raises(InputValidationError) as info:
        decode_infer(again)
    assert info.value.reason == reason, str(info.value)


def test_parameters_and_requested_outputs() -> None:
    req = fp32()
    req.parameters["routing_key"].string_param = "app"
    req.parameters["n"].int64_param = -3
    req.parameters["flag"].bool_param = True
    req.parameters["ratio"].double_param = 0.5
    req.parameters["empty"].CopyFrom(message_class("InferParameter")())
    req.outputs.add(name="b")
    decoded = decode_infer(req)
    assert decoded.parameters == {
        "routing_key": "app", "n": -3, "flag": True, "ratio": 0.5, "empty": None,
    }  # fmt: skip
    assert [o.name for o in decoded.outputs or ()] == ["b"]


def decode_response(response: Any) -> dict[str, np.ndarray]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                end = pos + 4 + int.from_bytes(raw[pos : pos + 4], "little")
                items.append(raw[pos + 4 : end])
                pos = end
            out[tensor.name] = np.array(items, dtype=object).reshape(tuple(tensor.shape))
        else:
            out[tensor.name] = np.frombuffer(raw, WIRE[tensor.datatype]).reshape(
                tuple(tensor.shape)
            )
    return out


def test_response_round_trip() -> None:
    outputs = {dt.lower(): sample(dt) for dt in [*WIRE, "BYTES"]}
    outputs["text"] = np.array(["é", "b"])  # numpy unicode goes as UTF-8 BYTES
    result = InferenceResult(
        model="m", model_version="3", outputs=outputs,
        parameters={"dropped": {"nan": 1}, "drift": True, "big": 2**70, "score": np.float32(0.5)},
    )  # fmt: skip
    response = message_class("ModelInferResponse").FromString(
        encode_infer(result, request_id="r").SerializeToString()
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r")
    got = decode_response(response)
    for name, array in outputs.items():
        if name == "text":
            assert got[name].tolist() == ["é".encode(), b"b"]
        elif array.dtype == object:
            assert got[name].tolist() == array.tolist()
        else:
            np.testing.assert_array_equal(got[name], array)
    params = response.parameters
    assert params["model_version"].string_param == "3"
    assert params["inference_source"].string_param == "device"
    assert params["dropped"].string_param == '{"nan":1}'
    assert params["drift"].bool_param is True
    assert params["big"].string_param == str(2**70)
    assert params["score"].double_param == 0.5


def test_requested_outputs_in_order_and_unknown_refused() -> None:
    result = InferenceResult("m", "1", {"a": np.zeros(2), "b": np.ones(3)})
    from edge_agent.api.decode import RequestedOutput

    response = encode_infer(result, outputs=(RequestedOutput("b"),))
    assert [o.name for o in response.outputs] == ["b"]
    with pytest.raises(InputValidationError) as info:
        encode_infer(result, outputs=(RequestedOutput("c"),))
    assert info.value.reason == "output"
    with pytest.raises(InferenceError):
        encode_infer(InferenceResult("m", "1", {"z": np.zeros(2, np.complex64)}))


def test_every_rpc_has_messages() -> None:
    assert set(METHODS) == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        # Triton's model repository extension (served with [api] repository_control only).
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip


DATATYPES = st.sampled_from([*WIRE, "BYTES", "BF16", "", "fp32", "FP32 "])
FIELDS = st.sampled_from(sorted(set(CONTENTS_FIELD.values())))


@st.composite
def hostile_request(draw: st.DrawFn) -> Any:
    req = Request(model_name="m")
    use_raw = draw(st.booleans())
    for index in range(draw(st.integers(0, 3))):
        tensor = req.inputs.add(
            name=draw(st.sampled_from(["a", "b", ""])), datatype=draw(DATATYPES)
        )
        dims = st.integers(-2, 2**33) | st.integers(0, 4)
        tensor.shape.extend(draw(st.lists(dims, max_size=5)))
        if use_raw or draw(st.booleans()):
            req.raw_input_contents.append(draw(st.binary(max_size=64)))
        if not use_raw or draw(st.booleans()):
            field = draw(FIELDS)
            values = getattr(tensor.contents, field)
            if field == "bytes_contents":
                values.extend(draw(st.lists(st.binary(max_size=4), max_size=8)))
            elif field == "bool_contents":
                values.extend(draw(st.lists(st.booleans(), max_size=8)))
            elif field.startswith("fp"):
                values.extend(draw(st.lists(st.floats(width=32), max_size=8)))
            else:
                lo = 0 if field.startswith("uint") else -(2**31)
                hi = 2**32 - 1 if field == "uint_contents" else 2**31 - 1
                values.extend(draw(st.lists(st.integers(lo, hi), max_size=8)))
        del index
    return Request.FromString(req.SerializeToString())


@settings(max_examples=400, deadline=None)
@given(hostile_request())
def test_decoder_property_typed_error_or_exact_arrays(req: Any) -> None:
    reasons = {"schema", "shape", "data", "datatype", "binary_size", "too_many_inputs"}
    try:
        decoded = decode_infer(req)
    except InputValidationError as exc:
        reason = exc.reason
        decoded = None
    if decoded is None:
        assert reason in reasons
        return
    assert list(decoded.inputs) == [t.name for t in req.inputs]
    for tensor in req.inputs:
        array = decoded.inputs[tensor.name]
        assert array.shape == tuple(tensor.shape)
        if tensor.datatype != "BYTES":
            assert array.dtype == np.dtype(WIRE[tensor.datatype]).newbyteorder("=")
