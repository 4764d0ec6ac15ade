"""Element type names: numpy's (contracts, runtimes) and the Open Inference Protocol's (v2 API).

Owns the one table between them. Does not own which dtypes a contract allows
(``edge_agent.contract.inputs.DTYPES``) or how requests are decoded (``edge_agent.api``).
"""

from __future__ import annotations

from edge_agent.errors import ContractError

__all__ = ["PROTOCOL_DATATYPES", "protocol_datatype"]

# The Open Inference Protocol's (KServe v2) name of each element type: what model metadata says
# and what a request's ``datatype`` must be. Contracts and runtimes use numpy's names.
# fmt: off
PROTOCOL_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "str": "BYTES", "bytes": "BYTES", "object": "BYTES",
}
# fmt: on


def protocol_datatype(dtype: str) -> str:
    """The protocol's name (``FP32``) of a numpy dtype name (``float32``); protocol names pass.

    Raises:
        ContractError: neither a known numpy name nor a protocol name.
    """
    name = PROTOCOL_DATATYPES.get(dtype)
    if name is not None:
        return name
    if dtype in PROTOCOL_DATATYPES.values():
        return dtype
    raise ContractError(f"dtype {dtype!r} has no Open Inference Protocol datatype")
