"""A contract file may leave out what has a default (preprocessing, nan_policy, payload cap).

The documented minimal contract (docs/model-builder.md) parses; a left-out ``preprocessing`` is
identity, ``{"kind": "identity"}`` spelled out is the same; an explicit ``null`` or a wrong type
is still refused with a ``ContractError`` naming the field.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.contract import InputContract, Preprocessing, TensorSpec
from edge_agent.errors import ContractError

MINIMAL: dict[str, Any] = {
    "name": "input",
    "dtype": "float32",
    "shape": [{"min": 1, "max": 64}, {"size": 4}],
}


def test_left_out_fields_take_their_defaults() -> None:
    contract = InputContract.from_dict({"tensors": [MINIMAL]})
    spec = contract.tensors[0]
    assert spec.preprocessing == Preprocessing("identity")
    assert spec.nan_policy == "reject"
    assert spec.ranges is None
    assert contract.max_payload_bytes == InputContract((spec,)).max_payload_bytes
    # A manifest spells everything out, and reads back the same.
    assert InputContract.from_dict(contract.to_dict()) == contract
    assert contract.to_dict()["tensors"][0]["preprocessing"] == {"kind": "identity"}


def test_identity_spelled_out_is_the_default() -> None:
    spelled = TensorSpec.from_dict({**MINIMAL, "preprocessing": {"kind": "identity"}})
    assert spelled == TensorSpec.from_dict(MINIMAL)


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("preprocessing", None, "preprocessing"),
        ("preprocessing", "identity", "preprocessing"),
        ("nan_policy", None, "nan_policy"),
        ("nan_policy", "ignore", "nan_policy"),
    ],
)
def test_present_but_wrong_is_still_refused(key: str, value: Any, where: str) -> None:
    with pytest.raises(ContractError, match=where):
        TensorSpec.from_dict({**MINIMAL, key: value})


def test_payload_cap_present_but_wrong_is_refused() -> None:
    with pytest.raises(ContractError, match="max_payload_bytes"):
        InputContract.from_dict({"tensors": [MINIMAL], "max_payload_bytes": "16M"})
