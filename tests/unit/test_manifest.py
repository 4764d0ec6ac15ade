"""The manifest wire format: round trips, strict parsing, the published JSON Schema."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from edge_agent.contract import (
    BundleManifest,
    Compatibility,
    DeviceProfile,
    DimSpec,
    FeatureRanges,
    InputContract,
    OutputContract,
    Preprocessing,
    TensorSpec,
)
from edge_agent.errors import ContractError, IncompatibleTargetError
from support import make_manifest, members

SCHEMA = json.loads(
    resources.files("edge_agent").joinpath("schemas/manifest.schema.json").read_text()
)
COMPAT = Path(__file__).parents[1] / "compat"


@pytest.fixture
def manifest_dict() -> dict[str, Any]:
    return make_manifest(b"artifact" * 4).to_dict()


def test_round_trip_is_exact(manifest_dict: dict[str, Any]) -> None:
    m = BundleManifest.from_dict(manifest_dict)
    assert m.to_dict() == manifest_dict
    assert BundleManifest.from_bytes(m.to_bytes()).to_bytes() == m.to_bytes()


def test_canonical_bytes_are_sorted_and_compact(manifest_dict: dict[str, Any]) -> None:
    data = BundleManifest.from_dict(manifest_dict).to_bytes()
    assert data == json.dumps(manifest_dict, sort_keys=True, separators=(",", ":")).encode()


def test_schema_accepts_built_manifests(manifest_dict: dict[str, Any]) -> None:
    jsonschema.validate(manifest_dict, SCHEMA)
    for bundle in COMPAT.glob("*/*.efb"):
        jsonschema.validate(json.loads(members(bundle.read_bytes())["manifest.json"]), SCHEMA)


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(d)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last: Any = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()

# Checks JSON Schema cannot express (ordering of two numbers, cross-references, PEP 440).
SEMANTIC_ONLY = {
    "inputs.tensors.0.shape.0",
    "inputs.tensors.0.ranges",
    "outputs.score_output",
    "compatibility.min_runtime_version",
}

BAD = [
    ("schema_version", 2, "schema_version"),
    ("name", "Digits!", "invalid model name"),
    ("version", 0, "positive"),
    ("version", True, "must be int"),
    ("version", "3", "must be int"),
    ("channel", "", "invalid channel"),
    ("artifact.sha256", "abc", "sha256"),
    ("artifact.length", 0, "length"),
    ("artifact.format", "pt", "format"),
    ("artifact.path", "../model.onnx", "path"),
    ("inputs.tensors", [], "at least one tensor"),
    ("inputs.tensors.0.dtype", "complex64", "dtype"),
    ("inputs.tensors.0.nan_policy", "ignore", "nan_policy"),
    ("inputs.tensors.0.shape.0", {"min": 5, "max": 2}, "bounds"),
    ("inputs.tensors.0.ranges", {"low": [1.0], "high": [0.0]}, "low must not exceed"),
    ("inputs.tensors.0.preprocessing", {"kind": "sigmoid"}, "preprocessing"),
    ("outputs.task", "segmentation", "task"),
    ("outputs.score_output", "missing", "score_output"),
    ("compatibility.runtime", "tensorrt", "runtime"),
    ("compatibility.min_runtime_version", "latest", "min_runtime_version"),
    ("compatibility.arch", [], "architecture"),
    ("provenance", _DELETE, "provenance"),
    ("baseline", _DELETE, "baseline"),
    ("golden", {"not": "a list"}, "golden"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_manifests_raise_contract_error_naming_the_problem(
    manifest_dict: dict[str, Any], path: str, value: Any, message: str
) -> None:
    bad = _set(manifest_dict, path, value)
    with pytest.raises(ContractError, match=message):
        BundleManifest.from_dict(bad)
    if path not in SEMANTIC_ONLY:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"{", b'{"schema_version": 1}'])
def test_garbage_bytes_raise_contract_error(data: bytes) -> None:
    with pytest.raises(ContractError):
        BundleManifest.from_bytes(data)


def test_tflite_artifact_needs_litert_runtime(manifest_dict: dict[str, Any]) -> None:
    bad = _set(_set(manifest_dict, "artifact.format", "tflite"), "artifact.path", "model.tflite")
    with pytest.raises(ContractError, match="cannot run on onnxruntime"):
        BundleManifest.from_dict(bad)


COMPAT_CASES = [
    (("any",), "x86_64", "1.20", None),
    (("x86_64",), "AMD64", "1.20", None),
    (("aarch64",), "arm64", "1.20", None),
    (("aarch64",), "x86_64", "1.20", "aarch64"),
    (("any",), "x86_64", "1.15.1", "1.16"),
    (("any",), "x86_64", "1.16", None),  # the minimum itself is enough
    (("any",), "x86_64", "not-a-version", "cannot compare"),
]


@pytest.mark.parametrize(("arch", "machine", "installed", "error"), COMPAT_CASES)
def test_compatibility_table(
    arch: tuple[str, ...], machine: str, installed: str, error: str | None
) -> None:
    c = Compatibility(runtime="onnxruntime", min_runtime_version="1.16", arch=arch)
    device = DeviceProfile(machine, {"onnxruntime": installed})
    if error is None:
        c.check(device)
    else:
        with pytest.raises(IncompatibleTargetError, match=error):
            c.check(device)


def test_accelerator_must_be_offered() -> None:
    c = Compatibility(runtime="onnxruntime", min_runtime_version="1.0", accelerator="npu")
    with pytest.raises(IncompatibleTargetError, match="npu"):
        c.check(DeviceProfile("x86_64", {"onnxruntime": "1.20"}))
    c.check(DeviceProfile("x86_64", {"onnxruntime": "1.20"}, accelerators=("cpu", "npu")))


def test_preprocessing_standardize_and_apply() -> None:
    pre = Preprocessing.standardize([2.0, 0.0], [4.0, 0.0])  # zero std falls back to 1
    x = np.array([[6.0, 3.0], [2.0, -1.0]])
    np.testing.assert_allclose(pre.apply(x), [[1.0, 3.0], [0.0, -1.0]])
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ContractError, match="2 values for 3 features"):
        pre.apply(np.zeros((1, 3)))


def test_tensor_spec_limits() -> None:
    spec = TensorSpec(
        "x",
        "float32",
        (DimSpec(min=1, max=32), DimSpec(size=8), DimSpec(size=8)),
        ranges=FeatureRanges((0.0,), (1.0,)),
    )
    assert spec.max_batch == 32
    assert spec.features_per_sample == 64
    with pytest.raises(ContractError, match="3 ranges for 64 features"):
        TensorSpec("x", "float32", spec.shape, ranges=FeatureRanges((0.0,) * 3, (1.0,) * 3))
    with pytest.raises(ContractError, match="duplicate input names"):
        InputContract((spec, spec))


def test_classification_output_needs_labels() -> None:
    with pytest.raises(ContractError, match="labels"):
        OutputContract(task="classification", outputs=("p",), score_output="p")
