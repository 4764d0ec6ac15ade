"""Device labels: what a valid ``key=value`` label is, and the lenient parse of a label map.

Owns the label rules both sides apply (``KEY``, ``VALUE``, ``MAX_LABELS``): the agent checks
its ``[labels]`` configuration and detected facts with them before reporting, the server checks
what a device reports (hostile input) and what an operator sets. A key is 1-63 characters of
``[A-Za-z0-9._-]`` starting and ending with a letter or digit, optionally behind a DNS-like
prefix and a slash (``example.com/line``, at most 253 + 1 + 63); a value is 1-63 characters of
the same alphabet, starting and ending with a letter or digit. These are Kubernetes' label
rules without the empty value, so a selector never has to tell "empty" from "absent".

``parse_labels`` is per-sample: a bad entry is dropped and counted by reason
(``LabelParse.refused``), never raised; ``check_labels`` is the strict form (operator input).

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edge_agent.errors import ContractError

__all__ = [
    "KEY",
    "MAX_KEY_CHARS",
    "MAX_LABELS",
    "MAX_VALUE_CHARS",
    "REFUSALS",
    "VALUE",
    "LabelParse",
    "check_labels",
    "label_problem",
    "parse_labels",
]

MAX_VALUE_CHARS: Final = 63
MAX_KEY_CHARS: Final = 253 + 1 + 63
#: Labels per source (the operator's, the device's) and device.
MAX_LABELS: Final = 32
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?"
KEY: Final = re.compile(rf"(?:{_PREFIX}/)?{_NAME}")
VALUE: Final = re.compile(_NAME)
#: Why a reported entry was dropped (``LabelParse.refused`` keys).
REFUSALS: Final = ("not_an_object", "bad_key", "bad_value", "too_many")


def label_problem(key: object, value: object) -> str | None:
    """Why ``key=value`` is not a valid label (``bad_key`` / ``bad_value``), None if it is."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not KEY.fullmatch(key):
        return "bad_key"
    if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS or not VALUE.fullmatch(value):
        return "bad_value"
    return None


@dataclass(frozen=True)
class LabelParse:
    """The valid labels of a map and how many entries were dropped, by reason."""

    labels: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)

    @property
    def refused_total(self) -> int:
        """Entries dropped for any reason."""
        return sum(self.refused.values())


def parse_labels(raw: Any, *, limit: int = MAX_LABELS) -> LabelParse:
    """Keep the valid labels of ``raw`` (a JSON object), in key order, at most ``limit``.

    Never raises: a non-object counts once as ``not_an_object``; each bad entry counts under
    its reason; entries beyond ``limit`` (in key order) count as ``too_many``.
    """
    if raw is None:
        return LabelParse()
    if not isinstance(raw, Mapping):
        return LabelParse(refused={"not_an_object": 1})
    if len(raw) > 16 * limit:  # not worth sorting: refuse the lot
        return LabelParse(refused={"too_many": len(raw)})
    refused: dict[str, int] = {}
    labels: dict[str, str] = {}
    for key in sorted(raw, key=str):
        problem = label_problem(key, raw[key])
        if problem is not None:
            refused[problem] = refused.get(problem, 0) + 1
        elif len(labels) >= limit:
            refused["too_many"] = refused.get("too_many", 0) + 1
        else:
            labels[key] = raw[key]
    return LabelParse(labels, refused)


def check_labels(raw: Mapping[str, Any], what: str, *, limit: int = MAX_LABELS) -> dict[str, str]:
    """``raw`` as labels, strictly.

    Raises:
        ContractError: a bad key or value (named, escaped), or more than ``limit`` labels.
    """
    if len(raw) > limit:
        raise ContractError(f"{what}: at most {limit} labels")
    out: dict[str, str] = {}
    for key, value in raw.items():
        problem = label_problem(key, value)
        if problem == "bad_key":
            raise ContractError(
                f"{what}: label key {str(key)[:80]!r} is not 1-63 of [A-Za-z0-9._-] "
                "(letter or digit at both ends), optionally behind a 'prefix/'"
            )
        if problem == "bad_value":
            raise ContractError(
                f"{what}: value {str(value)[:80]!r} of label {key} is not 1-63 of "
                "[A-Za-z0-9._-] (letter or digit at both ends)"
            )
        out[key] = value
    return out
