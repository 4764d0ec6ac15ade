"""Server and model metadata as the Open Inference Protocol spells them (pure, but for the cache).

Owns ``EXTENSIONS`` (what ``GET /v2`` advertises: only what this API serves),
``protocol_metadata`` (model metadata with the protocol's datatype names) and
``InputDatatypes`` (a request's tensors against the model's declared input datatypes). Does not
own the endpoints (``edge_agent.api.app``) or the name table (``edge_agent.contract.datatypes``).
"""

from __future__ import annotations

import time
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
    are cached per ``(model, version)`` (at most ``max_entries``) for ``max_age`` seconds (the
    agent itself picks up new versions every two seconds), and a mismatch is re-checked against
    fresh metadata before it is refused, so a new version's datatypes apply at once. Unknown
    models and inputs are left to the service (404, ``unknown_input``). Use from one event loop.
    """

    def __init__(
        self,
        metadata: Callable[[str, str | None], Mapping[str, Any]],
        *,
        max_entries: int = 256,
        max_age: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metadata = metadata
        self._max = max_entries
        self._max_age = max_age
        self._clock = clock
        self._known: dict[tuple[str, str | None], tuple[float, dict[str, np.dtype[Any]]]] = {}

    def check(self, model: str, version: str | None, inputs: Mapping[str, Array]) -> None:
        """Refuse an input whose datatype is not its model input's.

        Raises:
            InputValidationError: ``reason`` ``dtype``, ``field`` the input.
        """
        key = (model, version)
        entry = self._known.get(key)
        if entry is None or self._clock() - entry[0] > self._max_age:
            entry = self._load(key)
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

    def _load(self, key: tuple[str, str | None]) -> tuple[float, dict[str, np.dtype[Any]]] | None:
        try:
            meta = self._metadata(*key)
            types = {
                str(t["name"]): _NUMPY[protocol_datatype(str(t["datatype"]))]
                for t in meta.get("inputs") or []
            }
        except Exception:  # unknown model, odd metadata: the service answers the request
            self._known.pop(key, None)
            return None
        if len(self._known) >= self._max and key not in self._known:
            self._known.pop(next(iter(self._known)))
        entry = (self._clock(), types)
        self._known[key] = entry
        return entry


def _wire_name(dtype: np.dtype[Any]) -> str:
    return "BYTES" if dtype.kind in "OSU" else PROTOCOL_DATATYPES.get(dtype.name, dtype.name)
