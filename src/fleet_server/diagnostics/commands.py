"""Build and sign remote commands with the fleet server's online key.

Owns: the default arguments of each command (``default_arguments``: the operator gives only
what differs), checking them with the device's own rule before anything is signed
(``edge_agent.trust.command.parse_arguments``, so the server never signs what a device would
refuse), choosing the command id and expiry, and producing the signed wire bytes. The command
format and the device's checks live in ``edge_agent.trust.command`` (the shared contract); the
signers are the same online (``timestamp``) signers that sign desired state.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from securesystemslib.signer import Signer

from edge_agent.trust.command import (
    MAX_COMMAND_TTL,
    SignedCommand,
    encode_command,
    parse_arguments,
)

__all__ = [
    "DEFAULT_ARGUMENTS",
    "DEFAULT_TTL",
    "default_arguments",
    "make_command",
    "new_command_id",
    "sign_command",
]

DEFAULT_TTL: Final = timedelta(hours=1)
#: What each command gets for every argument the operator leaves out.
DEFAULT_ARGUMENTS: Final[Mapping[str, Mapping[str, Any]]] = {
    "ping": {},
    "logs": {"level": "info", "since": 0, "max_lines": 500, "max_bytes": 64 * 1024},
    "support-bundle": {"max_bytes": 4 * 1024 * 1024},
    "restart": {},
    "health-check": {},
}


def new_command_id() -> str:
    """32 random lowercase hex characters."""
    return secrets.token_hex(16)


def default_arguments(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over the command's defaults, checked as the device will check them.

    Raises:
        UnknownCommandError: ``name`` is not on the fixed list.
        CommandArgumentError: an argument is unknown, missing, of the wrong type or out of
            bounds.
    """
    args = {**DEFAULT_ARGUMENTS.get(name, {}), **given}
    parse_arguments(name, args)
    return args


def make_command(
    device_id: str,
    sequence: int,
    name: str,
    args: Mapping[str, Any],
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
    command_id: str | None = None,
) -> SignedCommand:
    """An unsigned command for one device, issued at ``now`` (whole seconds), expiring ``ttl``
    later.

    Raises:
        ValueError: ``ttl`` is not within (0, ``MAX_COMMAND_TTL``] or ``now`` is naive.
        UnknownCommandError, CommandArgumentError: as ``default_arguments``.
        MetadataFormatError: a field is invalid (device id, sequence).
    """
    if not timedelta(0) < ttl <= MAX_COMMAND_TTL:
        raise ValueError(f"ttl must be within (0, {MAX_COMMAND_TTL}], got {ttl}")
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    issued = now.replace(microsecond=0)
    return SignedCommand(
        command_id=command_id or new_command_id(),
        device_id=device_id,
        sequence=sequence,
        name=name,
        args=default_arguments(name, args),
        issued=issued,
        expires=issued + ttl,
    )


def sign_command(command: SignedCommand, signers: Sequence[Signer]) -> bytes:
    """Sign ``command`` with each online signer and encode it.

    Raises:
        ValueError: no signer given.
        MetadataFormatError: two signers share a key, or the command is too large.
    """
    if not signers:
        raise ValueError("at least one signer is needed")
    payload = command.signed_bytes()
    return encode_command(command, [s.sign(payload) for s in signers])
