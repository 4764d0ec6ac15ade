"""Datatypes as the Open Inference Protocol spells them, on every path of the v2 API.

Model metadata says ``FP32``/``INT64`` (never numpy's ``float32``); a request is accepted only
when each tensor's datatype is exactly its input's, refused with 400 and ``{"error": ...}``
otherwise (an FP64, FP16 or INT64 tensor sent to an FP32 input is never cast): a table of every
contract dtype x every wire datatype, through JSON, the binary extension (first request and the
header cache), the raw fast path and the router's versioned route, and before any cloud
fallback route. ``GET /v2`` advertises only the extensions the API serves. A generic client
that builds its request from the real agent's metadata is answered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from bundles import DigitsBundles
from edge_agent.api.app import create_app
from edge_agent.config import AgentConfig, ApiConfig, FallbackConfig, StoreConfig
from edge_agent.contract import DimSpec, InputContract, TensorSpec
from edge_agent.contract.datatypes import protocol_datatype
from edge_agent.contract.inputs import DTYPES
from edge_agent.contract.validation import Validator
from edge_agent.errors import ContractError, InputValidationError, ModelNotFoundError
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest, InferenceResult
from edge_agent.store import ModelStore
from support import DEVICE

WIRE = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
# fmt: off
_NUMPY = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
# fmt: on


class ValidatingService:
    """One model whose one input has ``dtype``; validates with the agent's real Validator."""

    def __init__(self, dtype: str, claims: tuple[str, ...] = ()) -> None:
        spec = TensorSpec("x", dtype, (DimSpec(min=1, max=8), DimSpec(size=2)))
        self.validator = Validator(InputContract((spec,)))
        self.dtype = dtype
        self.claims = claims

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> dict[str, str]:
        return {}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "fake", "version": "0", "extensions": list(self.claims)}

    def model_names(self) -> list[str]:
        return ["m"]

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        if name != "m":
            raise ModelNotFoundError(name)
        return {
            "name": "m",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": self.dtype, "shape": [-1, 2]}],
            "outputs": [
                {"name": "y", "datatype": "int64", "shape": [-1]},
                {"name": "s", "datatype": "str", "shape": [-1]},
                {"name": "c", "datatype": "complex64", "shape": [-1]},
            ],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return True

    def infer(self, request: InferenceRequest) -> InferenceResult:
        checked = self.validator.validate(request.inputs, request.payload_bytes)
        return InferenceResult(request.model, "1", {"y": np.arange(checked.rows_kept)})


def _values(wire: str) -> np.ndarray[Any, Any]:
    if wire == "BYTES":
        return np.array([b"a", b"b", b"c", b"d"], dtype=object).reshape(2, 2)
    return np.array([[1, 0], [0, 1]]).astype(_NUMPY[wire])


def _json_body(wire: str) -> bytes:
    values = _values(wire)
    data = [v.decode() for v in values.reshape(-1)] if wire == "BYTES" else values.tolist()
    doc = {"inputs": [{"name": "x", "datatype": wire, "shape": [2, 2], "data": data}]}
    return json.dumps(doc).encode()


def _binary_body(wire: str) -> tuple[bytes, str]:
    values = _values(wire)
    if wire == "BYTES":
        tail = b"".join(len(b).to_bytes(4, "little") + b for b in values.reshape(-1))
    else:
        tail = values.tobytes()
    size = {"binary_data_size": len(tail)}
    doc = {"inputs": [{"name": "x", "datatype": wire, "shape": [2, 2], "parameters": size}]}
    header = json.dumps(doc).encode()
    return header + tail, str(len(header))


def test_wire_values_have_the_datatype_they_claim() -> None:
    sizes = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4}
    sizes |= {"INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
    for wire, size in sizes.items():
        assert _values(wire).dtype.itemsize == size, wire


@pytest.mark.parametrize("wire", WIRE)
@pytest.mark.parametrize("declared", DTYPES)
def test_only_the_inputs_own_datatype_is_accepted(declared: str, wire: str) -> None:
    app = create_app(ValidatingService(declared), ApiConfig())
    expected = 200 if wire == protocol_datatype(declared) else 400
    binary, header_length = _binary_body(wire)
    binary_headers = {"Inference-Header-Content-Length": header_length}
    with TestClient(app) as client:
        sent = {
            "json": client.post("/v2/models/m/infer", content=_json_body(wire)),
            "json, versioned route": client.post(
                "/v2/models/m/versions/1/infer", content=_json_body(wire)
            ),
            "binary": client.post("/v2/models/m/infer", content=binary, headers=binary_headers),
            "binary, cached header": client.post(
                "/v2/models/m/infer", content=binary, headers=binary_headers
            ),
        }
    for path, response in sent.items():
        assert response.status_code == expected, (path, response.text)
        if expected == 400:
            error = response.json()["error"]
            assert isinstance(error, str), path
            if wire in ("FP16", "FP64", "INT64") and declared == "float32":
                assert f"is {wire} but the model's input is FP32" in error, path


def test_model_metadata_uses_the_protocol_names() -> None:
    with TestClient(create_app(ValidatingService("float32"), ApiConfig())) as client:
        meta = client.get("/v2/models/m").json()
        versioned = client.get("/v2/models/m/versions/1").json()
    assert meta == versioned
    assert [t["datatype"] for t in meta["inputs"]] == ["FP32"]
    assert [t["datatype"] for t in meta["outputs"]] == ["INT64", "BYTES", "complex64"]


def test_protocol_datatype_table() -> None:
    assert {protocol_datatype(d) for d in DTYPES} <= set(WIRE)
    assert protocol_datatype("FP32") == "FP32"
    with pytest.raises(ContractError):
        protocol_datatype("complex64")


def test_server_metadata_advertises_only_what_the_api_serves() -> None:
    service = ValidatingService("float32", claims=("model_repository", "binary_tensor_data"))
    with TestClient(create_app(service, ApiConfig())) as client:
        meta = client.get("/v2").json()
        assert meta["extensions"] == ["binary_tensor_data"]
        # The repository extension's index endpoint is not served: not advertised either.
        assert client.post("/v2/repository/index").status_code == 404


def test_a_generic_client_builds_its_request_from_the_agents_metadata(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    config = AgentConfig(store=StoreConfig(state_dir=str(tmp_path / "state")))
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    agent = Agent(config, store, background_drift=False)
    agent.install(digits_bundles.path(1))
    agent.start()
    try:
        with TestClient(create_app(agent, ApiConfig())) as client:
            meta = client.get("/v2/models/digits").json()
            inputs = []
            for tensor in meta["inputs"]:  # what tritonclient / kserve clients do
                shape = [1 if d == -1 else d for d in tensor["shape"]]
                data = np.zeros(shape, _NUMPY[tensor["datatype"]]).reshape(-1).tolist()
                inputs.append({**tensor, "shape": shape, "data": data})
            answer = client.post("/v2/models/digits/infer", json={"inputs": inputs})
            assert answer.status_code == 200, answer.text
            declared = {t["name"]: t["datatype"] for t in meta["outputs"]}
            for output in answer.json()["outputs"]:
                assert output["datatype"] == declared[output["name"]]
            as_numpy_names = [{**t, "datatype": "float32"} for t in inputs]
            refused = client.post("/v2/models/digits/infer", json={"inputs": as_numpy_names})
            assert refused.status_code == 400
            x = digits_bundles.x_eval[:1].astype("<f8")
            fp64 = [{"name": meta["inputs"][0]["name"], "datatype": "FP64", "shape": [1, 64]}]
            fp64[0]["data"] = x.reshape(-1).tolist()
            cast = client.post("/v2/models/digits/infer", json={"inputs": fp64})
            assert cast.status_code == 400
            assert "is FP64 but the model's input is FP32" in cast.json()["error"]
    finally:
        agent.close()


class RecordingCloud:
    """A cloud fallback transport that answers every request and records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[np.dtype[Any]] = []

    def request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Mapping[str, Any] | None = None,
        model_version: int | None = None,
    ) -> Mapping[str, Any]:
        x = next(iter(inputs.values()))
        self.sent.append(x.dtype)
        return {"probabilities": np.full((len(x), 10), 0.1, np.float32)}


@pytest.mark.parametrize("mode", ["cloud_only", "prefer_cloud", "prefer_device"])
def test_no_route_casts_a_mismatched_tensor(
    tmp_path: Path, digits_bundles: DigitsBundles, mode: str
) -> None:
    """The cloud routes (chosen by policy, or for input the device refuses) get the tensor as
    sent, so the agent refuses a mismatched datatype before any of them, as the device does."""
    cloud = RecordingCloud()
    config = AgentConfig(
        store=StoreConfig(state_dir=str(tmp_path / "state")),
        fallback=FallbackConfig(mode=mode),
    )
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    agent = Agent(config, store, transport=cloud, background_drift=False)
    agent.install(digits_bundles.path(1))
    agent.start()
    x = digits_bundles.x_eval[:2]
    try:
        with TestClient(create_app(agent, ApiConfig())) as client:
            for wire in ("FP64", "FP16", "INT64"):
                tensor = {"name": "input", "datatype": wire, "shape": [2, 64]}
                tensor["data"] = x.astype(_NUMPY[wire]).reshape(-1).tolist()
                refused = client.post("/v2/models/digits/infer", json={"inputs": [tensor]})
                assert refused.status_code == 400, (wire, refused.text)
                assert f"is {wire} but the model's input is FP32" in refused.json()["error"]
            assert cloud.sent == []  # refused before any route (device or cloud) saw it
            if mode == "prefer_device":
                x = x.copy()
                x[:, 0] = 1e6  # out of range, refused by the device: its fallback is the cloud
            tensor = {"name": "input", "datatype": "FP32", "shape": [2, 64]}
            answer = client.post(
                "/v2/models/digits/infer",
                json={"inputs": [{**tensor, "data": x.reshape(-1).tolist()}]},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["parameters"]["inference_source"] == "cloud"
            assert cloud.sent == [np.dtype(np.float32)]
    finally:
        agent.close()


def test_check_datatypes_refuses_only_typed_tensors_of_another_dtype() -> None:
    spec = TensorSpec("x", "float32", (DimSpec(min=1, max=8), DimSpec(size=2)))
    validator = Validator(InputContract((spec,)))
    validator.check_datatypes({"x": np.zeros((1, 2), np.float32)})
    validator.check_datatypes({"x": [[1, 2]]})  # untyped: validate converts it
    validator.check_datatypes({"other": np.zeros(1, np.int64)})  # unknown: validate's
    validator.check_datatypes({})  # missing: validate's
    for wire, dtype in [("FP64", "<f8"), ("FP16", "<f2"), ("INT64", "<i8"), ("BYTES", "O")]:
        with pytest.raises(InputValidationError, match=f"is {wire} but the model's input is FP32"):
            validator.check_datatypes({"x": np.zeros((1, 2), dtype)})
