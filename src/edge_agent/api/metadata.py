"""Server and model metadata as the Open Inference Protocol spells them (pure).

Owns ``EXTENSIONS`` (what ``GET /v2`` advertises: only what this API serves),
and ``protocol_metadata`` (model metadata with the protocol's datatype names). Does not own the
endpoints (``edge_agent.api.endpoints``), the name table (``edge_agent.contract.datatypes``) or the
datatype check of a request (``Validator.check_datatypes``, on every route the agent takes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_agent.contract.datatypes import protocol_datatype
from edge_agent.errors import ContractError

__all__ = ["EXTENSIONS", "protocol_metadata"]

# The protocol extensions this API always serves. A client that sees an extension calls its
# endpoints, so the model repository extension (``api.repository.EXTENSION``) is added by the
# front ends only when ``[api] repository_control`` serves it.
EXTENSIONS = ("binary_tensor_data",)


def protocol_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Model metadata with the protocol's datatype names (``FP32``, not numpy's ``float32``).

    A generic v2 client builds its request from these names, and the API accepts exactly them.
    """
    document = dict(meta)
    for key in ("inputs", "outputs"):
        tensors = document.get(key)
        if isinstance(tensors, list):
            document[key] = [_protocol_tensor(t) for t in tensors]
    return document


def _protocol_tensor(tensor: Any) -> Any:
    if not isinstance(tensor, Mapping) or not isinstance(tensor.get("datatype"), str):
        return tensor
    try:
        return {**tensor, "datatype": protocol_datatype(tensor["datatype"])}
    except ContractError:
        return tensor  # a runtime type the protocol has no name for: say what it is
