"""Fleet drift results: the value types ``score_fleet`` returns and their JSON form (pure).

Owns: per-feature scores of a cell (``FeatureResult``), a scored cohort cell (``CohortResult``),
a device that drifted on its own (``DeviceAlert``), the whole report (``FleetDriftResult``) and
their ``to_dict`` (the admin API's body; non-finite numbers as null).
Does not own: cohort specs and merge keys (``drift.cohorts``), merging or scoring
(``drift.fleet``), reading telemetry (``drift.service``) or charts (``drift.report``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.drift import TierAView
from fleet_server.drift.cohorts import CohortSpec, FleetKey

__all__ = ["CohortResult", "DeviceAlert", "FeatureResult", "FleetDriftResult"]


def _f(x: float) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class FeatureResult:
    """One feature of one scored cell (scores as ``edge_agent.drift.score`` defines them)."""

    feature: int
    psi: float
    js: float
    ks: float
    mean_shift: float
    psi_threshold: float
    ks_threshold: float
    mean_shift_threshold: float
    n: int
    judged: bool
    drifted: bool
    by_test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers as null)."""
        return {
            "feature": self.feature,
            "psi": _f(self.psi),
            "js": _f(self.js),
            "ks": _f(self.ks),
            "mean_shift": _f(self.mean_shift),
            "psi_threshold": _f(self.psi_threshold),
            "ks_threshold": _f(self.ks_threshold),
            "mean_shift_threshold": _f(self.mean_shift_threshold),
            "n": self.n,
            "judged": self.judged,
            "drifted": self.drifted,
            "by_test": list(self.by_test),
        }


@dataclass(frozen=True, eq=False)
class CohortResult:
    """One merged cell scored against its baseline."""

    key: FleetKey
    devices: tuple[str, ...]
    windows: int
    features: tuple[FeatureResult, ...]
    view: TierAView

    @property
    def drifted(self) -> tuple[int, ...]:
        """Indices of the drifted features."""
        return tuple(r.feature for r in self.features if r.drifted)

    def to_dict(self, *, include_view: bool = False) -> dict[str, Any]:
        """JSON-safe dict; ``include_view`` adds the merged ``TierAView.to_dict()``."""
        k = self.key
        out: dict[str, Any] = {
            "model": k.model, "version": k.version, "tensor": k.tensor, "role": k.role,
            "cohort": k.cohort, "bucket": k.bucket, "devices": len(self.devices),
            "windows": self.windows, "rows": int(self.view.total().max(initial=0)),
            "alert": bool(self.drifted), "drifted": list(self.drifted),
            "features": [r.to_dict() for r in self.features],
        }  # fmt: skip
        if include_view:
            out["view"] = self.view.to_dict()
        return out


@dataclass(frozen=True)
class DeviceAlert:
    """A device whose own merged windows drifted in a cell (only alerting devices are kept)."""

    key: FleetKey
    drifted: tuple[int, ...]
    windows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        k = self.key
        return {
            "device_id": k.cohort, "model": k.model, "version": k.version, "tensor": k.tensor,
            "role": k.role, "bucket": k.bucket, "drifted": list(self.drifted),
            "windows": self.windows,
        }  # fmt: skip


@dataclass(frozen=True, eq=False)
class FleetDriftResult:
    """Every scored cell, the drifting devices, and what was skipped (counts by reason)."""

    spec: CohortSpec
    cohorts: tuple[CohortResult, ...]
    device_alerts: tuple[DeviceAlert, ...]
    devices_scored: int
    skipped: Mapping[str, int]
    baselines: Mapping[tuple[str, int, str, str], TierAView]

    def drifted_features(self) -> list[dict[str, Any]]:
        """Per (model, version, tensor, feature, bucket): the cohorts and devices it drifted in."""
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}

        def entry(k: FleetKey, j: int) -> dict[str, Any]:
            key = (k.model, k.version, k.role, k.tensor, j, k.bucket or 0.0)
            return rows.setdefault(key, {
                "model": k.model, "version": k.version, "tensor": k.tensor, "role": k.role,
                "feature": j, "bucket": k.bucket, "cohorts": [], "devices": [],
            })  # fmt: skip

        for c in self.cohorts:
            for r in c.features:
                if r.drifted:
                    entry(c.key, r.feature)["cohorts"].append(c.key.cohort)
        for d in self.device_alerts:
            for j in d.drifted:
                entry(d.key, j)["devices"].append(d.key.cohort)
        return [rows[k] for k in sorted(rows)]

    def to_dict(self, *, include_views: bool = False) -> dict[str, Any]:
        """JSON-safe dict (the admin API's body); views and baselines with ``include_views``."""
        out: dict[str, Any] = {
            "by": str(self.spec),
            "cohorts": [c.to_dict(include_view=include_views) for c in self.cohorts],
            "drifted": self.drifted_features(),
            "device_alerts": [d.to_dict() for d in self.device_alerts],
            "devices_scored": self.devices_scored,
            "skipped": dict(sorted(self.skipped.items())),
        }
        if include_views:
            out["baselines"] = [
                {"model": m, "version": v, "tensor": t, "role": r, "view": view.to_dict()}
                for (m, v, t, r), view in sorted(self.baselines.items())
            ]
        return out
