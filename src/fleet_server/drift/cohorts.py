"""Fleet drift cohorts and cells: how device windows are labelled and keyed (pure values).

Owns: the cohort spec (``CohortSpec``: fleet, group, tag:KEY or device) and what it reads of a
device (``DeviceInfo``), one decoded device window (``FleetWindow``), the merge cell key
(``FleetKey``) and the whole-fleet label (``FLEET``). Does not own: merging or scoring
(``drift.fleet``), the scored results (``drift.results``) or reading telemetry
(``drift.service``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.drift import TierAView
from fleet_server.errors import FleetDriftError

__all__ = ["FLEET", "CohortSpec", "DeviceInfo", "FleetKey", "FleetWindow"]

#: Cohort label of the whole fleet (always scored, whatever the cohort spec).
FLEET = "*"
_NO_TAG = "(none)"
_UNKNOWN = "(unknown device)"


@dataclass(frozen=True)
class DeviceInfo:
    """What a cohort spec reads of a device."""

    group: str
    tags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CohortSpec:
    """How devices are grouped: ``fleet`` (no split), ``group``, ``tag:KEY`` or ``device``."""

    kind: str = "fleet"
    key: str = ""

    @classmethod
    def parse(cls, text: str | None) -> CohortSpec:
        """Parse ``None``/``""``/``fleet``, ``group``, ``device`` or ``tag:KEY``.

        Raises:
            FleetDriftError: anything else.
        """
        if text is None or text in ("", "fleet"):
            return cls()
        if text in ("group", "device"):
            return cls(text)
        if text.startswith("tag:") and len(text) > 4:
            return cls("tag", text[4:])
        raise FleetDriftError(f"cohort must be group, device or tag:KEY, got {text!r}")

    def __str__(self) -> str:
        return f"tag:{self.key}" if self.kind == "tag" else self.kind

    def label(self, device_id: str, device: DeviceInfo | None) -> str | None:
        """The device's cohort, or None when the spec does not split (fleet only)."""
        if self.kind == "fleet":
            return None
        if self.kind == "device":
            return device_id
        if device is None:
            return _UNKNOWN
        if self.kind == "group":
            return device.group
        value = device.tags.get(self.key)
        return _NO_TAG if value is None else str(value)


@dataclass(frozen=True)
class FleetWindow:
    """One decoded tier-A window of one device (``at``: the report's Unix time)."""

    device_id: str
    model: str
    version: int
    tensor: str
    role: str
    at: float
    view: TierAView
    windows: int = 1  # >1: an exact merge of that many windows (a rollup)


@dataclass(frozen=True, order=True)
class FleetKey:
    """A merge cell; ``bucket`` is the bucket's start (Unix s) or None for the whole range."""

    model: str
    version: int
    tensor: str
    role: str
    cohort: str
    bucket: float | None

    def baseline_key(self) -> tuple[str, int, str, str]:
        """``(model, version, tensor, role)``: which baseline view scores this cell."""
        return (self.model, self.version, self.tensor, self.role)
