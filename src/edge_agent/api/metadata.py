"""Server and model metadata as the Open Inference Protocol spells them (pure, but for the cache).

Owns ``EXTENSIONS`` (what ``GET /v2`` advertises: only what this API serves),
``protocol_metadata`` (model metadata with the protocol's datatype names) and
``InputDatatypes`` (a request's tensors against the model's declared input datatypes). Does not
own the endpoints (``edge_agent.api.app``) or the name table (``edge_agent.contract.datatypes``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_agent.contract.datatypes import PROTOCOL_DATATYPES, protocol_datatype
from edge_agent.errors import ContractError, InputValidationError
from edge_agent.service import Array

__all__ = ["EXTENSIONS", "InputDatatypes", "protocol_metadata"]

# The array dtype a decoded tensor of each protocol datatype has (``edge_agent.api.decode``).
_NUMPY: dict[str, np.dtype[Any]] = {
    name: np.dtype(numpy) for numpy, name in PROTOCOL_DATATYPES.items() if name != "BYTES"
}
_NUMPY["BYTES"] = np.dtype(object)

# The protocol extensions this API serves. A client that sees an extension calls its endpoints,
# so the model repository extension is not listed until its index endpoint is served.
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


class InputDatatypes:
    """Each model's input datatypes, from its metadata, to refuse a mismatched tensor early.

    The protocol wants each input tensor in exactly its input's datatype; checking it here, for
    every path a decoded request takes (device or cloud), means no route casts silently. Entries
    are cached per ``(model, version)`` (at most ``max_entries``) and dropped when the model
    answers with another version than the one cached; a mismatch is re-checked against fresh
    metadata once before it is refused. Unknown models and inputs are left to the service
    (404, ``unknown_input``). Use from one event loop.
    """

    def __init__(
        self,
        metadata: Callable[[str, str | None], Mapping[str, Any]],
        max_entries: int = 256,
    ) -> None:
        self._metadata = metadata
        self._max = max_entries
        self._known: dict[tuple[str, str | None], tuple[str, dict[str, np.dtype[Any]]]] = {}

    def check(self, model: str, version: str | None, inputs: Mapping[str, Array]) -> None:
        """Refuse an input whose datatype is not its model input's.

        Raises:
            InputValidationError: ``reason`` ``dtype``, ``field`` the input.
        """
        key = (model, version)
        entry = self._known.get(key) or self._load(key)
        if entry is None:
            return
        types = entry[1]
        for name, array in inputs.items():
            want = types.get(name)
            dtype = array.dtype
            if want is None or dtype is want or dtype == want:  # builtin dtypes are singletons
                continue
            fresh = self._load(key)  # the model may have changed under the cache
            want = fresh[1].get(name) if fresh is not None else None
            if want is not None and dtype != want:
                raise InputValidationError(
                    f"input {name!r} is {_wire_name(dtype)} but the model's input is "
                    f"{_wire_name(want)}",
                    field=name,
                    reason="dtype",
                )

    def answered(self, model: str, version: str | None, model_version: str) -> None:
        """The model answered with ``model_version``: forget a cache entry of another one."""
        entry = self._known.get((model, version))
        if entry is not None and entry[0] != model_version:
            del self._known[(model, version)]

    def _load(self, key: tuple[str, str | None]) -> tuple[str, dict[str, np.dtype[Any]]] | None:
        try:
            meta = self._metadata(*key)
            versions = meta.get("versions") or [""]
            types = {
                str(t["name"]): _NUMPY[protocol_datatype(str(t["datatype"]))]
                for t in meta.get("inputs") or []
            }
        except Exception:  # unknown model, odd metadata: the service answers the request
            self._known.pop(key, None)
            return None
        if len(self._known) >= self._max and key not in self._known:
            self._known.pop(next(iter(self._known)))
        entry = (str(versions[0]), types)
        self._known[key] = entry
        return entry


def _wire_name(dtype: np.dtype[Any]) -> str:
    return "BYTES" if dtype.kind in "OSU" else PROTOCOL_DATATYPES.get(dtype.name, dtype.name)
