"""The ``model_version`` field of a fallback request: round trip, strict checks, typed errors."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import ContractError
from edge_agent.wire.fallback import MAGIC, MAX_VERSION, FallbackRequest

X = {"x": np.zeros((1, 4), np.float32)}


@pytest.mark.parametrize("version", [None, 1, 2, MAX_VERSION])
def test_model_version_round_trips_and_is_absent_when_none(version: int | None) -> None:
    r = FallbackRequest("m", X, 100.0, model_version=version)
    back = FallbackRequest.from_bytes(r.to_bytes())
    assert back.model_version == version
    assert ("model_version" in r.to_dict()) is (version is not None)


@pytest.mark.parametrize("bad", [0, -1, MAX_VERSION + 1, True, 2.0, "2", [2], {}])
def test_a_bad_model_version_is_refused_typed_on_both_sides(bad: Any) -> None:
    with pytest.raises(ContractError, match="model_version"):
        FallbackRequest("m", X, 100.0, model_version=bad)
    header = FallbackRequest("m", X, 100.0).to_dict()
    header["model_version"] = bad
    head = json.dumps(header).encode()
    payload = struct.pack("<4sI", MAGIC, len(head)) + head + X["x"].tobytes()
    with pytest.raises(ContractError, match="model_version"):
        FallbackRequest.from_bytes(payload)
