"""A device's answer to a remote command, and the support-bundle upload offer inside one (pure).

Owns: ``CommandAnswer`` (what a device publishes on ``<prefix>/devices/<id>/commands/resp``
with the command's correlation data) and ``UploadOffer`` (the ``result`` of a
``support-bundle`` answer: the archive's length, SHA-256 and block size, from which the server
plans the block transfer with ``edge_agent.wire.transfer.BlockPlan``). Bytes and values in,
values out or ``ContractError``; no sockets, files or clocks.

Does not own the command itself or its verification (``edge_agent.trust.command``), running
it (``edge_agent.sync.ops.commands``) or the block messages of the upload
(``edge_agent.wire.transfer``, the same messages a model bundle travels in, the other way).

Wire format (compact JSON, at most ``MAX_ANSWER_BYTES``)::

    {"schema_version": 1, "type": "command_answer", "device_id": "cam-7",
     "command_id": "<32 hex>" | null, "name": "logs" | null, "ok": true,
     "error": null | {"code": "command_unknown", "message": "..."}, "result": {...}}

``command_id`` and ``name`` are null when the refused message could not even be parsed (the
server matches the answer by correlation data). A device's answer is hostile input to the
server: every string is bounded here, and the server escapes what it shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from edge_agent import strict_json
from edge_agent.errors import ContractError
from edge_agent.ids import DEVICE_ID_PATTERN
from edge_agent.wire.transfer import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, BlockPlan, checked_int

__all__ = [
    "ANSWER_TYPE",
    "MAX_ANSWER_BYTES",
    "MAX_CORRELATION_BYTES",
    "MAX_ERROR_MESSAGE",
    "SCHEMA_VERSION",
    "CommandAnswer",
    "UploadOffer",
]

SCHEMA_VERSION: Final = 1
ANSWER_TYPE: Final = "command_answer"
#: Largest answer (a ``logs`` answer: 192 KiB of text plus JSON framing).
MAX_ANSWER_BYTES: Final = 256 * 1024
MAX_ERROR_MESSAGE: Final = 500
#: Correlation data the device echoes: the command id (32 hex), with room to spare.
MAX_CORRELATION_BYTES: Final = 64
#: Largest support bundle a device may offer (``edge_agent.trust.command`` caps what it builds).
MAX_OFFER_BYTES: Final = 16 * 1024 * 1024

_KEYS = frozenset(
    {"schema_version", "type", "device_id", "command_id", "name", "ok", "error", "result"}
)
_COMMAND_ID_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _opt(value: object, pattern: re.Pattern[str], what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ContractError(f"{what} is invalid")
    return value


@dataclass(frozen=True)
class CommandAnswer:
    """One answer. ``ok`` with a ``result``, or not ``ok`` with ``error_code``/``error``.

    Raises:
        ContractError: a field is badly formed (on construction).
    """

    device_id: str
    command_id: str | None
    name: str | None
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise ContractError("unsupported schema_version")
        if not isinstance(self.device_id, str) or not DEVICE_ID_PATTERN.fullmatch(self.device_id):
            raise ContractError("device_id is invalid")
        _opt(self.command_id, _COMMAND_ID_RE, "command_id")
        _opt(self.name, _NAME_RE, "name")
        if not isinstance(self.ok, bool) or not isinstance(self.result, dict):
            raise ContractError("ok must be a boolean and result an object")
        if self.ok != (self.error_code is None) or (self.error_code is None) != (
            self.error is None
        ):
            raise ContractError("an answer is ok without error, or has an error code and text")
        _opt(self.error_code, _CODE_RE, "error code")
        if self.error is not None and (
            not isinstance(self.error, str) or len(self.error) > MAX_ERROR_MESSAGE
        ):
            raise ContractError(f"error message must be at most {MAX_ERROR_MESSAGE} characters")

    @classmethod
    def refusal(
        cls, device_id: str, command_id: str | None, name: str | None, code: str, message: str
    ) -> CommandAnswer:
        """A refusal, with ``message`` cut to ``MAX_ERROR_MESSAGE`` characters."""
        return cls(
            device_id, command_id, name, False, error_code=code, error=message[:MAX_ERROR_MESSAGE]
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the wire format."""
        error = None
        if self.error_code is not None:
            error = {"code": self.error_code, "message": self.error}
        return {
            "schema_version": self.schema_version,
            "type": ANSWER_TYPE,
            "device_id": self.device_id,
            "command_id": self.command_id,
            "name": self.name,
            "ok": self.ok,
            "error": error,
            "result": self.result,
        }

    def to_bytes(self) -> bytes:
        """Encode to the wire format.

        Raises:
            ContractError: the answer would exceed ``MAX_ANSWER_BYTES`` or is not JSON-safe.
        """
        try:
            data = json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ContractError(f"answer is not JSON-encodable: {exc}") from exc
        if len(data) > MAX_ANSWER_BYTES:
            raise ContractError(f"answer of {len(data)} bytes exceeds {MAX_ANSWER_BYTES}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> CommandAnswer:
        """Decode strictly.

        Raises:
            ContractError: oversized, not JSON, missing or unknown fields, bad values.
        """
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_ANSWER_BYTES:
            raise ContractError(f"an answer must be bytes of at most {MAX_ANSWER_BYTES}")
        doc = strict_json.loads(bytes(data), max_bytes=MAX_ANSWER_BYTES, what="command answer")
        if not isinstance(doc, dict) or set(doc) != _KEYS:
            raise ContractError("command answer: wrong fields")
        if doc["type"] != ANSWER_TYPE:
            raise ContractError("not a command answer")
        error = doc["error"]
        code = message = None
        if error is not None:
            if not isinstance(error, dict) or set(error) != {"code", "message"}:
                raise ContractError("error must be {code, message}")
            code, message = error["code"], error["message"]
        return cls(
            schema_version=doc["schema_version"],
            device_id=doc["device_id"],
            command_id=doc["command_id"],
            name=doc["name"],
            ok=doc["ok"],
            result=doc["result"],
            error_code=code,
            error=message,
        )


@dataclass(frozen=True)
class UploadOffer:
    """The result of a ``support-bundle`` answer: the archive the device holds for upload.

    Raises:
        ContractError: a field is out of range or badly formed (on construction).
    """

    length: int
    sha256: str
    block_size: int

    def __post_init__(self) -> None:
        checked_int(self.length, "length", minimum=1, maximum=MAX_OFFER_BYTES)
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ContractError("sha256 is invalid")
        checked_int(self.block_size, "block_size", minimum=MIN_BLOCK_SIZE, maximum=MAX_BLOCK_SIZE)

    @property
    def plan(self) -> BlockPlan:
        """The block plan of the upload (its ``transfer_id`` binds every block to it)."""
        return BlockPlan(self.length, self.sha256, self.block_size)

    def to_dict(self) -> dict[str, Any]:
        """The ``result`` object of the answer."""
        return {
            "length": self.length,
            "sha256": self.sha256,
            "block_size": self.block_size,
            "transfer_id": self.plan.transfer_id,
        }

    @classmethod
    def from_dict(cls, data: object) -> UploadOffer:
        """Parse an answer's ``result``.

        Raises:
            ContractError: missing, unknown or invalid fields, or a ``transfer_id`` that does
                not match the plan.
        """
        if not isinstance(data, dict) or set(data) != {
            "length",
            "sha256",
            "block_size",
            "transfer_id",
        }:
            raise ContractError("upload offer: wrong fields")
        offer = cls(data["length"], data["sha256"], data["block_size"])
        if data["transfer_id"] != offer.plan.transfer_id:
            raise ContractError("upload offer: transfer_id does not match its plan")
        return offer
