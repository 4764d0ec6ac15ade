"""The convenience client converts within a kind to the model's declared datatype, never across."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.client import _datatype, conform_inputs
from edge_agent.errors import InputValidationError

META = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT32", "shape": [-1]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
    ]
}


@pytest.mark.parametrize(
    ("name", "value", "dtype"),
    [
        ("x", np.zeros((2, 4), np.float64), np.float32),  # np.save's default float: converted
        ("x", np.zeros((2, 4), np.float16), np.float32),
        ("ids", np.zeros(3, np.int64), np.int32),  # np.save's default integer: converted
        ("x", np.zeros((2, 4), np.int64), np.int64),  # another kind: left for the agent to refuse
        ("ids", np.zeros(3, np.float64), np.float64),
        ("text", np.array([b"a"], object), object),  # BYTES: nothing to convert to
        ("unknown", np.zeros(1, np.float64), np.float64),  # the agent answers unknown_input
    ],
)
def test_conform_inputs(name: str, value: np.ndarray, dtype: type) -> None:
    out = conform_inputs({name: value}, META)
    assert out[name].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out[name], value)


def test_conform_inputs_tolerates_odd_metadata() -> None:
    value = np.zeros(2, np.float64)
    for meta in (None, {}, {"inputs": [{"name": "x", "datatype": "COMPLEX"}]}):
        assert conform_inputs({"x": value}, meta)["x"].dtype == np.float64


def test_datatype_names_are_the_protocols() -> None:
    assert _datatype(np.dtype(np.float32)) == "FP32"
    assert _datatype(np.dtype(np.uint16)) == "UINT16"
    with pytest.raises(InputValidationError):
        _datatype(np.dtype(np.complex64))
