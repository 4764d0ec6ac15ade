"""The strict field checks the signed desired-state document and its assignments share.

Owns ``exact_keys`` (a JSON object with exactly the known fields), ``int_field`` (a bounded
integer, never a bool) and ``str_field`` (a string that ``fullmatch``es its pattern), each
raising ``MetadataFormatError``, and the hex patterns (``SHA256_RE``, ``HEX_RE``). Does not own
the documents (``edge_agent.trust.desired``, ``edge_agent.trust.assignment``) nor the name and
device-id rules (``edge_agent.ids``).

Pure: values in, values out or a typed error.
"""

from __future__ import annotations

import re
from typing import Any

from edge_agent.errors import MetadataFormatError

__all__ = ["HEX_RE", "SHA256_RE", "exact_keys", "int_field", "str_field"]

SHA256_RE = re.compile(r"[0-9a-f]{64}")
HEX_RE = re.compile(r"(?:[0-9a-f]{2})+")


def int_field(value: object, what: str, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``minimum..maximum``.

    Raises:
        MetadataFormatError: it is not.
    """
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise MetadataFormatError(f"{what} must be an integer {bound}, got {value!r}")
    return value


def str_field(value: object, what: str, pattern: re.Pattern[str]) -> str:
    """``value`` if it is a string that ``pattern`` fully matches.

    Raises:
        MetadataFormatError: it is not.
    """
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise MetadataFormatError(f"{what} is invalid: {value!r}")
    return value


def exact_keys(obj: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    """``obj`` if it is a JSON object with exactly ``keys``.

    Raises:
        MetadataFormatError: it is not an object, or a field is missing or unknown.
    """
    if not isinstance(obj, dict):
        raise MetadataFormatError(f"{what} must be a JSON object")
    if set(obj) != keys:
        missing = sorted(keys - set(obj))
        extra = sorted(set(obj) - keys)
        raise MetadataFormatError(f"{what}: missing fields {missing}, unknown fields {extra}")
    return obj
