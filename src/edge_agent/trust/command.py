"""Signed remote commands: what the fleet server may ask one device to do, and the device's check.

Pure: bytes in, a verified ``SignedCommand`` (then typed arguments) or a typed error out; the
clock is passed in.

Owns: the command value object (``SignedCommand``), its signed wire format
(``encode_command``), the check a device runs before acting on one (``verify_command``), the
fixed list of command names (``COMMAND_NAMES``) and their typed, bounded arguments
(``parse_arguments``). Does not run anything (``edge_agent.sync.ops.commands`` does), hold the
anti-replay sequence across restarts (the device persists it) or sign (the server does, in
``fleet_server.diagnostics.commands``, with the same online keys as desired state).

Wire format (the TUF-style envelope of ``edge_agent.trust.desired``, canonical JSON)::

    {"signed": {"_type": "device-command", "schema_version": 1,
                "command_id": "<32 hex>", "device_id": "cam-7", "sequence": 41,
                "name": "logs", "args": {"level": "info", "since": 0, "max_lines": 500,
                                         "max_bytes": 65536},
                "issued": "2026-06-01T00:00:00Z", "expires": "2026-06-01T01:00:00Z"},
     "signatures": [{"keyid": "<hex>", "sig": "<hex>"}]}

A threshold of the root's ``timestamp`` (online) keys signs the canonical JSON of ``signed``.
``sequence`` is per device and strictly increasing: the server allocates it, the device keeps
the last one it accepted and refuses any command whose sequence is not greater (MQTT delivers a
session's messages in order, so commands queued while a device was offline arrive in order).
A group command is resolved by the server into one command per device, each addressed and
sequenced on its own.

Attack -> check -> error:
    malformed / oversized / wrong type   strict parse                  MetadataFormatError
    unsigned, wrong or too few keys      threshold of timestamp keys   SignatureThresholdError
    tampered after signing               signature over canonical JSON SignatureThresholdError
    stale (held back, replayed late)     ``expires`` vs ``now``;       ExpiredMetadataError
                                         ``issued`` not in the future
    addressed to another device          device id                     MixAndMatchError
    replayed / reordered                 sequence > last accepted      RollbackError
    not on the fixed list                ``parse_arguments``           UnknownCommandError
    arguments unknown or out of bounds   ``parse_arguments``           CommandArgumentError

Nothing here, or anywhere on the device, turns a command into a shell: each name maps to one
function of the agent with the typed arguments below.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from securesystemslib.signer import Signature

from edge_agent.errors import (
    CommandArgumentError,
    ContractError,
    ExpiredMetadataError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
    UnknownCommandError,
)
from edge_agent.ids import DEVICE_ID_PATTERN, NAME_PATTERN
from edge_agent.trust import envelope
from edge_agent.trust.capture_settings import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, UploadSettings
from edge_agent.trust.fields import exact_keys, int_field, str_field
from edge_agent.trust.root import TrustedRoot

__all__ = [
    "COMMAND_NAMES",
    "COMMAND_TYPE",
    "LOG_LEVELS",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_TTL",
    "MAX_LOG_BYTES",
    "MAX_LOG_LINES",
    "MAX_SUPPORT_BUNDLE_BYTES",
    "MIN_SUPPORT_BUNDLE_BYTES",
    "SCHEMA_VERSION",
    "SIGNING_ROLE",
    "CaptureUploadArgs",
    "CommandArgs",
    "HealthCheckArgs",
    "LogsArgs",
    "NoArgs",
    "SignedCommand",
    "SupportBundleArgs",
    "encode_command",
    "parse_arguments",
    "verify_command",
]

COMMAND_TYPE: Final = "device-command"
SCHEMA_VERSION: Final = 1
#: The same role as desired state: the server's online key.
SIGNING_ROLE: Final = envelope.SIGNING_ROLE
MAX_COMMAND_BYTES: Final = 16 * 1024
MAX_SIGNATURES: Final = envelope.MAX_SIGNATURES
#: Longest a command may live between issue and expiry (an offline device waits at most this).
MAX_COMMAND_TTL: Final = timedelta(days=7)
#: How far ``issued`` may lie ahead of the device's clock (clock skew).
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
MAX_SEQUENCE: Final = 2**53 - 1
#: ``logs``: most records and bytes of message text one answer carries.
MAX_LOG_LINES: Final = 5000
MAX_LOG_BYTES: Final = 192 * 1024
#: ``support-bundle``: the bounds of the archive's size cap.
MIN_SUPPORT_BUNDLE_BYTES: Final = 64 * 1024
MAX_SUPPORT_BUNDLE_BYTES: Final = 16 * 1024 * 1024
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: The fixed list. Adding a name is a new agent release, never a server-side setting.
COMMAND_NAMES: Final = (
    "ping",
    "logs",
    "support-bundle",
    "restart",
    "health-check",
    "capture-config",
    "capture-upload",
)
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

_COMMAND_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Known-name syntax, checked before the list so a garbled name is a format error.
_NAME_SYNTAX = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SIGNED_KEYS = frozenset(
    {
        "_type",
        "schema_version",
        "command_id",
        "device_id",
        "sequence",
        "name",
        "args",
        "issued",
        "expires",
    }
)


@dataclass(frozen=True)
class NoArgs:
    """``ping`` and ``restart`` take no arguments."""


@dataclass(frozen=True)
class LogsArgs:
    """``logs``: records at or above ``level`` since ``since`` (UNIX seconds, 0: all), newest
    kept when over ``max_lines`` records or ``max_bytes`` of text."""

    level: str
    since: int
    max_lines: int
    max_bytes: int


@dataclass(frozen=True)
class SupportBundleArgs:
    """``support-bundle``: build a tar.gz of at most ``max_bytes`` and offer it for upload."""

    max_bytes: int


@dataclass(frozen=True)
class HealthCheckArgs:
    """``health-check``: re-run the golden samples of the serving version of ``model``."""

    model: str


@dataclass(frozen=True)
class CaptureUploadArgs:
    """``capture-upload``: acknowledge the chunk with SHA-256 ``ack`` ("" for none) and offer
    the next chunk of ``model``'s captured records, at most ``max_bytes``."""

    model: str
    ack: str
    max_bytes: int


CommandArgs = (
    NoArgs | LogsArgs | SupportBundleArgs | HealthCheckArgs | UploadSettings | CaptureUploadArgs
)


def _arg_int(value: object, what: str, minimum: int, maximum: int) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise CommandArgumentError(f"{what} must be an integer {minimum}..{maximum}")
    return value


def _arg_keys(args: dict[str, Any], keys: frozenset[str], name: str) -> None:
    if set(args) != keys:
        raise CommandArgumentError(
            f"{name} takes exactly the arguments {sorted(keys)}; "
            f"missing {sorted(keys - set(args))}, unknown {sorted(set(args) - keys)[:8]}"
        )


def parse_arguments(name: str, args: object) -> CommandArgs:
    """The typed arguments of command ``name`` (also what the server checks before signing).

    Raises:
        UnknownCommandError: ``name`` is not in ``COMMAND_NAMES``.
        CommandArgumentError: ``args`` is not an object with exactly the command's arguments,
            each of its type and within its bounds.
    """
    if name not in COMMAND_NAMES:
        raise UnknownCommandError(f"unknown command {name[:40]!r}")
    if not isinstance(args, dict):
        raise CommandArgumentError("args must be a JSON object")
    if name in ("ping", "restart"):
        _arg_keys(args, frozenset(), name)
        return NoArgs()
    if name == "logs":
        _arg_keys(args, frozenset({"level", "since", "max_lines", "max_bytes"}), name)
        if args["level"] not in LOG_LEVELS:
            raise CommandArgumentError(f"level must be one of {', '.join(LOG_LEVELS)}")
        return LogsArgs(
            level=args["level"],
            since=_arg_int(args["since"], "since", 0, MAX_SEQUENCE),
            max_lines=_arg_int(args["max_lines"], "max_lines", 1, MAX_LOG_LINES),
            max_bytes=_arg_int(args["max_bytes"], "max_bytes", 1024, MAX_LOG_BYTES),
        )
    if name == "support-bundle":
        _arg_keys(args, frozenset({"max_bytes"}), name)
        return SupportBundleArgs(
            _arg_int(
                args["max_bytes"], "max_bytes", MIN_SUPPORT_BUNDLE_BYTES, MAX_SUPPORT_BUNDLE_BYTES
            )
        )
    if name == "capture-config":
        try:
            return UploadSettings.from_dict(args)
        except ContractError as exc:
            raise CommandArgumentError(str(exc)) from exc
    if name == "capture-upload":
        _arg_keys(args, frozenset({"model", "ack", "max_bytes"}), name)
        ack = args["ack"]
        if not isinstance(ack, str) or not (ack == "" or _SHA256_RE.fullmatch(ack)):
            raise CommandArgumentError("ack must be a SHA-256 hex digest or empty")
        model = args["model"]
        if not isinstance(model, str) or not NAME_PATTERN.fullmatch(model):
            raise CommandArgumentError("model must be a model name")
        return CaptureUploadArgs(
            model, ack, _arg_int(args["max_bytes"], "max_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        )
    _arg_keys(args, frozenset({"model"}), name)  # health-check
    model = args["model"]
    if not isinstance(model, str) or not NAME_PATTERN.fullmatch(model):
        raise CommandArgumentError("model must be a model name")
    return HealthCheckArgs(model)


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise MetadataFormatError(f"{what} must be a string")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise MetadataFormatError(f"{what} {value[:40]!r} is not {TIME_FORMAT}") from exc


@dataclass(frozen=True)
class SignedCommand:
    """One command as the server signs it (arguments still raw: see ``parse_arguments``).

    Raises:
        MetadataFormatError: a field is out of range or badly formed (on construction).
    """

    command_id: str
    device_id: str
    sequence: int
    name: str
    args: dict[str, Any]
    issued: datetime
    expires: datetime
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise MetadataFormatError(f"unsupported schema_version {self.schema_version!r}")
        str_field(self.command_id, "command_id", _COMMAND_ID_RE)
        str_field(self.device_id, "device_id", DEVICE_ID_PATTERN)
        int_field(self.sequence, "sequence", minimum=1, maximum=MAX_SEQUENCE)
        str_field(self.name, "command name", _NAME_SYNTAX)
        if not isinstance(self.args, dict):
            raise MetadataFormatError("args must be a JSON object")
        for when in (self.issued, self.expires):
            if (
                not isinstance(when, datetime)
                or when.utcoffset() != timedelta(0)
                or when.microsecond != 0
            ):
                raise MetadataFormatError("issued/expires must be UTC datetimes in whole seconds")
        if not self.issued < self.expires <= self.issued + MAX_COMMAND_TTL:
            raise MetadataFormatError(
                f"a command must expire after it is issued and within {MAX_COMMAND_TTL}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` part of the envelope."""
        return {
            "_type": COMMAND_TYPE,
            "schema_version": self.schema_version,
            "command_id": self.command_id,
            "device_id": self.device_id,
            "sequence": self.sequence,
            "name": self.name,
            "args": self.args,
            "issued": self.issued.strftime(TIME_FORMAT),
            "expires": self.expires.strftime(TIME_FORMAT),
        }

    @classmethod
    def from_dict(cls, data: object) -> SignedCommand:
        """Parse the ``signed`` part strictly.

        Raises:
            MetadataFormatError: wrong ``_type``, missing, unknown or invalid fields.
        """
        d = exact_keys(data, _SIGNED_KEYS, "command")
        if d["_type"] != COMMAND_TYPE:
            raise MetadataFormatError(f"expected {COMMAND_TYPE}, got {str(d['_type'])[:40]!r}")
        return cls(
            schema_version=d["schema_version"],
            command_id=d["command_id"],
            device_id=d["device_id"],
            sequence=d["sequence"],
            name=d["name"],
            args=d["args"],
            issued=_time(d["issued"], "issued"),
            expires=_time(d["expires"], "expires"),
        )

    def signed_bytes(self) -> bytes:
        """Canonical JSON of ``to_dict()``: the bytes every signature covers.

        Raises:
            MetadataFormatError: ``args`` holds a value canonical JSON cannot encode (a float).
        """
        return envelope.canonical(self.to_dict())

    def arguments(self) -> CommandArgs:
        """The typed arguments (``parse_arguments(self.name, self.args)``).

        Raises:
            UnknownCommandError, CommandArgumentError: as ``parse_arguments``.
        """
        return parse_arguments(self.name, self.args)


def encode_command(command: SignedCommand, signatures: list[Signature]) -> bytes:
    """The wire bytes: canonical JSON of ``{"signed": ..., "signatures": [...]}``.

    Raises:
        MetadataFormatError: two signatures carry the same key id, or the result would exceed
            ``MAX_COMMAND_BYTES``.
    """
    return envelope.encode_envelope(command.to_dict(), signatures, max_bytes=MAX_COMMAND_BYTES)


def verify_command(
    root: TrustedRoot,
    data: bytes,
    *,
    now: datetime,
    device_id: str,
    last_sequence: int,
) -> SignedCommand:
    """Verify a command as this device must before acting on it (arguments not yet parsed).

    The caller persists the returned ``sequence`` before running the command (a ``restart``
    must not run again when its message is redelivered), then calls ``arguments()``.

    Args:
        root: the device's current trusted root.
        data: the envelope bytes as received.
        now: the reference time (timezone-aware).
        device_id: this device's id.
        last_sequence: the sequence of the last command this device accepted (0 if none).

    Returns:
        The verified command.

    Raises:
        MetadataFormatError: oversized, not JSON, wrong ``_type``, missing/unknown/invalid
            fields, duplicate signatures.
        SignatureThresholdError: fewer valid signatures than the ``timestamp`` threshold.
        ExpiredMetadataError: the root or the command has expired at ``now``, or the command
            was issued more than ``MAX_CLOCK_SKEW`` in the future.
        MixAndMatchError: the command is addressed to another device.
        RollbackError: ``sequence`` is not greater than ``last_sequence`` (a replay).
    """
    command, payload, sigs = envelope.parse_envelope(
        data,
        max_bytes=MAX_COMMAND_BYTES,
        what="command",
        parse=SignedCommand.from_dict,
        signed_bytes=SignedCommand.signed_bytes,
    )
    envelope.verify_signatures(root, payload, sigs, "command")
    root.check_expiry(now)
    if now >= command.expires:
        raise ExpiredMetadataError(f"command {command.command_id} expired at {command.expires}")
    if command.issued > now + MAX_CLOCK_SKEW:
        raise ExpiredMetadataError(f"command {command.command_id} is issued in the future")
    if not hmac.compare_digest(command.device_id.encode(), device_id.encode()):
        raise MixAndMatchError(
            f"command is addressed to {command.device_id!r}, this device is {device_id!r}"
        )
    if command.sequence <= last_sequence:
        raise RollbackError(
            f"command sequence {command.sequence} is not newer than accepted {last_sequence}"
        )
    return command
