"""The identifier rules every role shares: device ids and model/channel names. Pure.

A device id is a certificate CN, an MQTT username and client id, a topic level and a field of
every signed desired-state document, so it must be safe in all of them: a DNS label, lowercase
(no '/', '+', '#', '$', no case confusion between two devices). A model name or channel becomes
a directory, a topic level and a field of the manifest and the desired state: 1-63 characters
of ``[a-z0-9._-]``, starting with a letter or digit.

This module is the one owner of both rules: the identity files (``edge_agent.common.identity``),
the topic tree, the wire parsers, the manifest (``edge_agent.contract.manifest``) and the
desired-state checks (``edge_agent.trust.desired``, ``edge_agent.trust.assignment``) call
``validate_device_id`` / ``validate_name`` or ``fullmatch`` the patterns. Always
``fullmatch``: ``re.match`` with a ``$``-terminated pattern accepts a trailing newline (``$``
matches before it). Does not own what a caller raises for a bad value beyond these two
validators (each caller maps it to its own error family).
"""

from __future__ import annotations

import re

from edge_agent.errors import ContractError, IdentityError

__all__ = [
    "DEVICE_ID_PATTERN",
    "NAME_PATTERN",
    "is_valid_name",
    "validate_device_id",
    "validate_name",
]

DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: Model names and channels. Use ``fullmatch`` (or ``is_valid_name``), never ``match``.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id.

    Raises:
        IdentityError: not a lowercase DNS label of 1-63 characters.
    """
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise IdentityError(
            f"invalid device id {device_id!r}: use 1-63 lowercase letters, digits and '-' "
            "(not at either end)"
        )
    return device_id


def is_valid_name(value: object) -> bool:
    """Whether ``value`` is a valid model name or channel (never raises)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def validate_name(value: str, what: str = "model name") -> str:
    """Return ``value`` if it is a valid model name or channel (``what`` names it in errors).

    Raises:
        ContractError: not 1-63 characters of ``[a-z0-9._-]`` starting with a letter or digit.
    """
    if not is_valid_name(value):
        raise ContractError(f"invalid {what} {value!r}: use 1-63 chars of [a-z0-9._-]")
    return value
