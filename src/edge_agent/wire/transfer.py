"""The block transfer protocol for model bundles: the plan and the wire messages (pure).

Owns: how a bundle of a signed length is cut into blocks (``BlockPlan``) and the two wire
messages (``BlockRequest`` from a device, ``BlockData`` from the server, on a per-device topic
or on a wave's shared broadcast topic). Bytes and values in, values out or a typed error: no
sockets, files or clocks. Does not own the device-side bookkeeping of which blocks arrived
(``Progress``, in ``edge_agent.wire.transfer_progress``), the partial file on
disk (``edge_agent.sync.transfer_store``), serving blocks (``fleet_server.delivery.blocks``) or
MQTT (the
transport adapter).

Security: the plan is built from the signed ``ModelAssignment`` (length and SHA-256), so the
signed length caps every transfer. ``Progress.check`` refuses an index beyond the last block and
any payload whose length differs from its block's exact length (only the last block is short),
so no peer can make a device write a byte beyond the signed length. A transfer id is derived
from (sha256, length, block size): blocks of another bundle, or of another block layout, are
refused with ``TransferMismatchError``. The whole file is verified against the signed SHA-256
before anything installs it (``PartialDownload.finish``); a block is not trusted on its own.

Wire format (both messages)::

    uint16 big-endian header length | JSON header (UTF-8, compact) | raw payload (BlockData only)

    BlockRequest header: {"schema_version": 1, "type": "block_request",
                          "transfer_id": "<32 hex>", "ranges": [[start, stop], ...]}
    BlockData header:    {"schema_version": 1, "type": "block_data",
                          "transfer_id": "<32 hex>", "index": 7, "length": 65536}

Ranges are half-open ``[start, stop)`` block indices, sorted, disjoint and not touching, at most
``MAX_RANGES`` of them (a device asks for its first missing ranges and asks again later).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from edge_agent import strict_json
from edge_agent.errors import (
    ContractError,
    LengthMismatchError,
    TransferMismatchError,
)
from edge_agent.trust.assignment import MAX_BUNDLE_LENGTH, ModelAssignment

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RANGES",
    "MIN_BLOCK_SIZE",
    "SCHEMA_VERSION",
    "BlockData",
    "BlockPlan",
    "BlockRequest",
    "transfer_id_for",
]

SCHEMA_VERSION: Final = 1
MIN_BLOCK_SIZE: Final = 64 * 1024
MAX_BLOCK_SIZE: Final = 128 * 1024
DEFAULT_BLOCK_SIZE: Final = 64 * 1024
#: Most ranges one ``BlockRequest`` may carry (keeps requests well under 1 KiB).
MAX_RANGES: Final = 32
MAX_HEADER_BYTES: Final = 1024
MAX_MESSAGE_BYTES: Final = 2 + MAX_HEADER_BYTES + MAX_BLOCK_SIZE
#: Largest block index any plan can have (signed length cap / smallest block size).
_MAX_INDEX: Final = MAX_BUNDLE_LENGTH // MIN_BLOCK_SIZE

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TRANSFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_REQUEST_TYPE = "block_request"
_DATA_TYPE = "block_data"
_REQUEST_KEYS = frozenset({"schema_version", "type", "transfer_id", "ranges"})
_DATA_KEYS = frozenset({"schema_version", "type", "transfer_id", "index", "length"})


def transfer_id_for(sha256: str, length: int, block_size: int) -> str:
    """Derive the transfer id that binds messages to one bundle and one block layout.

    Args:
        sha256: lowercase hex SHA-256 of the bundle file.
        length: signed length of the bundle in bytes.
        block_size: block size of the plan.

    Returns:
        32 lowercase hex characters.
    """
    material = f"edgefleet-transfer-v{SCHEMA_VERSION}\n{sha256}\n{length}\n{block_size}"
    return hashlib.sha256(material.encode("ascii")).hexdigest()[:32]


def checked_int(value: object, what: str, *, minimum: int, maximum: int) -> int:
    """``value`` if it is an int (not a bool) within ``minimum..maximum``.

    Shared with ``transfer_progress``, so both wire modules refuse a field the same way.

    Raises:
        ContractError: anything else (``what`` names the field).
    """
    if type(value) is not int or not minimum <= value <= maximum:
        raise ContractError(f"{what} must be an integer {minimum}..{maximum}, got {value!r}")
    return value


def _transfer_id(value: object) -> str:
    if not isinstance(value, str) or not _TRANSFER_ID_RE.fullmatch(value):
        raise ContractError(f"transfer_id is invalid: {value!r}")
    return value


@dataclass(frozen=True)
class BlockPlan:
    """How a bundle of a signed length and digest is cut into blocks.

    Attributes:
        length: exact bundle length in bytes (the signed transfer cap).
        sha256: lowercase hex SHA-256 of the whole bundle.
        block_size: bytes per block (64..128 KiB); the last block may be shorter.

    Raises:
        ContractError: a field is out of range or badly formed (on construction).
    """

    length: int
    sha256: str
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        checked_int(self.length, "length", minimum=1, maximum=MAX_BUNDLE_LENGTH)
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ContractError(f"sha256 is invalid: {self.sha256!r}")
        checked_int(self.block_size, "block_size", minimum=MIN_BLOCK_SIZE, maximum=MAX_BLOCK_SIZE)

    @classmethod
    def from_assignment(
        cls, assignment: ModelAssignment, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> BlockPlan:
        """Plan the transfer of the bundle a verified desired state assigns.

        Raises:
            ContractError: ``block_size`` is out of range.
        """
        return cls(assignment.bundle_length, assignment.bundle_sha256, block_size)

    @property
    def n_blocks(self) -> int:
        """Number of blocks (at least 1)."""
        return -(-self.length // self.block_size)

    @property
    def transfer_id(self) -> str:
        """The id every message of this transfer carries (see ``transfer_id_for``)."""
        return transfer_id_for(self.sha256, self.length, self.block_size)

    def block_range(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, stop)`` of block ``index``.

        Raises:
            LengthMismatchError: ``index`` is not a block of this plan (beyond the signed length).
        """
        if type(index) is not int or not 0 <= index < self.n_blocks:
            raise LengthMismatchError(f"block {index!r} is outside 0..{self.n_blocks - 1}")
        start = index * self.block_size
        return start, min(start + self.block_size, self.length)

    def block_length(self, index: int) -> int:
        """Exact length of block ``index``.

        Raises:
            LengthMismatchError: ``index`` is not a block of this plan.
        """
        start, stop = self.block_range(index)
        return stop - start


# --- framing -------------------------------------------------------------------------------


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ContractError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return len(raw).to_bytes(2, "big") + raw + payload


def _unframe(
    data: bytes | bytearray | memoryview, expected_type: str, keys: frozenset[str]
) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError("message must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ContractError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    data = bytes(data)
    if len(data) < 2:
        raise ContractError("message truncated before its header length")
    header_len = int.from_bytes(data[:2], "big")
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise ContractError(f"header length {header_len} out of range 1..{MAX_HEADER_BYTES}")
    if len(data) < 2 + header_len:
        raise ContractError("message truncated inside its header")
    header = strict_json.loads(data[2 : 2 + header_len], max_bytes=MAX_HEADER_BYTES, what="header")
    if not isinstance(header, dict):
        raise ContractError("header must be a JSON object")
    if set(header) != keys:
        raise ContractError(
            f"header fields: missing {sorted(keys - set(header))}, "
            f"unknown {sorted(set(header) - keys)}"
        )
    if type(header["schema_version"]) is not int or header["schema_version"] != SCHEMA_VERSION:
        raise ContractError(f"unsupported schema_version {header['schema_version']!r}")
    if header["type"] != expected_type:
        raise ContractError(f"expected a {expected_type} message, got {header['type']!r}")
    return header, data[2 + header_len :]


def _check_transfer(transfer_id: str, plan: BlockPlan | None) -> None:
    if plan is not None and transfer_id != plan.transfer_id:
        raise TransferMismatchError(
            f"message for transfer {transfer_id}, expected {plan.transfer_id}"
        )


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRequest:
    """A device asks for the blocks it is missing.

    Attributes:
        transfer_id: the plan's ``transfer_id``.
        ranges: half-open ``(start, stop)`` block index ranges; non-empty, sorted, disjoint and
            not adjacent, at most ``MAX_RANGES``.
        schema_version: wire schema version (only ``SCHEMA_VERSION``).

    Raises:
        ContractError: a field is badly formed (on construction).
    """

    transfer_id: str
    ranges: tuple[tuple[int, int], ...]
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"unsupported schema_version {self.schema_version!r}")
        _transfer_id(self.transfer_id)
        if not isinstance(self.ranges, tuple) or not 1 <= len(self.ranges) <= MAX_RANGES:
            raise ContractError(f"ranges must be a tuple of 1..{MAX_RANGES} ranges")
        previous_stop = -1
        for item in self.ranges:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ContractError(f"range must be a (start, stop) pair, got {item!r}")
            start = checked_int(item[0], "range start", minimum=0, maximum=_MAX_INDEX)
            stop = checked_int(item[1], "range stop", minimum=1, maximum=_MAX_INDEX + 1)
            if start >= stop or start <= previous_stop:
                raise ContractError(f"ranges must be non-empty, sorted and disjoint: {item!r}")
            previous_stop = stop

    def blocks(self, plan: BlockPlan) -> list[int]:
        """Every requested block index, ascending, after checking the request against ``plan``
        (so a hostile request cannot make the caller expand millions of indices).

        Raises:
            TransferMismatchError, LengthMismatchError: see ``check``.
        """
        self.check(plan)
        return [i for start, stop in self.ranges for i in range(start, stop)]

    def check(self, plan: BlockPlan) -> None:
        """Check this request against the transfer it names.

        Raises:
            TransferMismatchError: the request is for another transfer.
            LengthMismatchError: a range reaches beyond the plan's last block.
        """
        _check_transfer(self.transfer_id, plan)
        if self.ranges[-1][1] > plan.n_blocks:
            raise LengthMismatchError(
                f"requested blocks up to {self.ranges[-1][1] - 1}, plan has {plan.n_blocks}"
            )

    def to_bytes(self) -> bytes:
        """Encode to the wire format."""
        header = {
            "schema_version": self.schema_version,
            "type": _REQUEST_TYPE,
            "transfer_id": self.transfer_id,
            "ranges": [list(r) for r in self.ranges],
        }
        return _frame(header)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, plan: BlockPlan | None = None
    ) -> BlockRequest:
        """Decode strictly; with ``plan``, also check it against that transfer.

        Raises:
            ContractError: truncated, oversize, trailing bytes or a malformed header.
            TransferMismatchError: ``plan`` is given and the request is for another transfer.
            LengthMismatchError: ``plan`` is given and a range is beyond its last block.
        """
        header, rest = _unframe(data, _REQUEST_TYPE, _REQUEST_KEYS)
        if rest:
            raise ContractError(f"{len(rest)} trailing bytes after a block request")
        ranges = header["ranges"]
        if not isinstance(ranges, list) or not all(isinstance(r, list) for r in ranges):
            raise ContractError("ranges must be a list of [start, stop] lists")
        request = cls(_transfer_id(header["transfer_id"]), tuple(tuple(r) for r in ranges))
        if plan is not None:
            request.check(plan)
        return request


@dataclass(frozen=True)
class BlockData:
    """One block of a bundle, sent to one device or broadcast to a wave.

    Attributes:
        transfer_id: the plan's ``transfer_id``.
        index: block index.
        payload: the block's bytes (1..``MAX_BLOCK_SIZE``).
        schema_version: wire schema version (only ``SCHEMA_VERSION``).

    Raises:
        ContractError: a field is badly formed (on construction).
    """

    transfer_id: str
    index: int
    payload: bytes
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"unsupported schema_version {self.schema_version!r}")
        _transfer_id(self.transfer_id)
        checked_int(self.index, "index", minimum=0, maximum=_MAX_INDEX)
        if not isinstance(self.payload, bytes) or not 1 <= len(self.payload) <= MAX_BLOCK_SIZE:
            raise ContractError(f"payload must be 1..{MAX_BLOCK_SIZE} bytes")

    def check(self, plan: BlockPlan) -> None:
        """Check this block against the transfer it names.

        Raises:
            TransferMismatchError: the block belongs to another transfer.
            LengthMismatchError: the index is beyond the last block or the payload is not the
                block's exact length.
        """
        _check_transfer(self.transfer_id, plan)
        expected = plan.block_length(self.index)
        if len(self.payload) != expected:
            raise LengthMismatchError(
                f"block {self.index} has {len(self.payload)} bytes, expected {expected}"
            )

    def to_bytes(self) -> bytes:
        """Encode to the wire format."""
        header = {
            "schema_version": self.schema_version,
            "type": _DATA_TYPE,
            "transfer_id": self.transfer_id,
            "index": self.index,
            "length": len(self.payload),
        }
        return _frame(header, self.payload)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, plan: BlockPlan | None = None
    ) -> BlockData:
        """Decode strictly; with ``plan``, also check it against that transfer.

        Raises:
            ContractError: truncated, oversize, a payload whose size differs from the header's
                ``length``, or a malformed header.
            TransferMismatchError: ``plan`` is given and the block is of another transfer.
            LengthMismatchError: ``plan`` is given and the block is out of range or of the
                wrong length.
        """
        header, payload = _unframe(data, _DATA_TYPE, _DATA_KEYS)
        length = checked_int(header["length"], "length", minimum=1, maximum=MAX_BLOCK_SIZE)
        if len(payload) != length:
            raise ContractError(f"payload has {len(payload)} bytes, header says {length}")
        block = cls(_transfer_id(header["transfer_id"]), header["index"], payload)
        if plan is not None:
            block.check(plan)
        return block
