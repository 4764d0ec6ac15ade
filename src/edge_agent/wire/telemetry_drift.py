"""Drift in the telemetry report: ``DriftSummary`` and the model's ``DriftWindows`` part.

Owns ``DriftSummary`` (one closed tier-A drift window of one tensor: a nested value object with
strict ``from_dict`` and ``to_dict``, built from a ``DriftMonitor`` window by ``from_window``) and
``DriftWindows``, the part of ``ModelStats`` (see ``edge_agent.wire.fields.Part``) that owns the
key ``drift`` (at most ``MAX_WINDOWS`` windows). Does not own the drift maths
(``edge_agent.drift``) or the model and the report (``edge_agent.wire.telemetry_model``,
``edge_agent.wire.telemetry_report``); does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from edge_agent.drift.monitor import DriftWindow
from edge_agent.drift.view import TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    as_int,
    as_label,
    as_number,
    as_object,
    as_opt_number,
    as_str,
    require,
)

__all__ = ["MAX_WINDOWS", "DriftSummary", "DriftWindows"]

#: Drift windows of one model in one report.
MAX_WINDOWS: Final = 64


@dataclass(frozen=True)
class DriftSummary:
    """One closed tier-A drift window of one tensor.

    Attributes:
        tensor: Tensor name.
        role: ``"input"`` or ``"output"``.
        start: Agent clock (s) at the window's first row; compare only within one device.
        end: Agent clock (s) at which it closed.
        reason: Why it closed: ``"count"``, ``"time"`` or ``"flush"``.
        rows: Samples in the window.
        view: ``TierAView.to_bytes()`` (travels as base64); exact to merge across devices.
        alert: The calibrated verdict alerted.
        drifted: Indices of the features that drifted.
        max_psi: Largest PSI over judged features (None if none was scorable).
        max_js: Largest Jensen-Shannon divergence, likewise.
        max_ks: Largest Kolmogorov-Smirnov statistic, likewise.
    """

    tensor: str
    role: str
    start: float
    end: float
    reason: str
    rows: int
    view: bytes
    alert: bool
    drifted: tuple[int, ...] = ()
    max_psi: float | None = None
    max_js: float | None = None
    max_ks: float | None = None

    def tier_a_view(self) -> TierAView:
        """The window's sketch. Raises ContractError (bytes that are not a tier-A view)."""
        return TierAView.from_bytes(self.view)

    @classmethod
    def from_window(cls, window: DriftWindow) -> DriftSummary:
        """Summarise a ``DriftMonitor`` window."""

        def top(values: Any) -> float | None:
            finite = [float(x) for x in values if math.isfinite(float(x))]
            return max(finite) if finite else None

        return cls(
            tensor=window.tensor,
            role=window.role,
            start=float(window.start),
            end=float(window.end),
            reason=window.reason,
            rows=window.rows,
            view=window.view.to_bytes(),
            alert=bool(window.verdict.alert),
            drifted=tuple(window.verdict.drifted_features()),
            max_psi=top(window.scores.psi),
            max_js=top(window.scores.js),
            max_ks=top(window.scores.ks),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "tensor": self.tensor,
            "role": self.role,
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "rows": self.rows,
            "view": base64.b64encode(self.view).decode("ascii"),
            "alert": self.alert,
            "drifted": list(self.drifted),
            "max_psi": self.max_psi,
            "max_js": self.max_js,
            "max_ks": self.max_ks,
        }

    @classmethod
    def from_dict(cls, d: Any) -> DriftSummary:
        """Parse strictly; the view must decode as a tier-A view.

        Raises:
            ContractError: a missing or mistyped field, bad base64, or an invalid view.
        """
        w = "drift window"
        d = as_object(d, w)
        role = require(d, "role", w)
        if role not in ("input", "output"):
            raise ContractError(f"{w}: role must be 'input' or 'output'")
        try:
            view = base64.b64decode(
                as_str(require(d, "view", w), f"{w}.view", 1 << 20), validate=True
            )
        except (binascii.Error, ValueError) as exc:
            raise ContractError(f"{w}: view is not base64") from exc
        TierAView.from_bytes(view)
        drifted = require(d, "drifted", w) if "drifted" in d else []
        if not isinstance(drifted, list) or len(drifted) > 4096:
            raise ContractError(f"{w}: drifted must be a list of feature indices")
        alert = require(d, "alert", w)
        if not isinstance(alert, bool):
            raise ContractError(f"{w}: alert must be a boolean")
        return cls(
            tensor=as_label(require(d, "tensor", w), f"{w}.tensor"),
            role=role,
            start=as_number(require(d, "start", w), f"{w}.start", lo=-math.inf),
            end=as_number(require(d, "end", w), f"{w}.end", lo=-math.inf),
            reason=as_label(require(d, "reason", w), f"{w}.reason"),
            rows=as_int(require(d, "rows", w), f"{w}.rows"),
            view=view,
            alert=alert,
            drifted=tuple(as_int(i, f"{w}.drifted[]") for i in drifted),
            max_psi=as_opt_number(d.get("max_psi"), f"{w}.max_psi"),
            max_js=as_opt_number(d.get("max_js"), f"{w}.max_js"),
            max_ks=as_opt_number(d.get("max_ks"), f"{w}.max_ks"),
        )


@dataclass(frozen=True)
class DriftWindows:
    """The tier-A drift windows of one model closed since the previous report.

    Attributes:
        drift: The windows, oldest first (at most ``MAX_WINDOWS``).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("drift",)

    drift: tuple[DriftSummary, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """``drift``."""
        return {"drift": [w.to_dict() for w in self.drift]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftWindows:
        """Parse strictly. Raises ContractError (not a list, too many, an invalid window)."""
        drift = require(d, "drift", "model")
        if not isinstance(drift, list) or len(drift) > MAX_WINDOWS:
            raise ContractError(f"model: drift must be a list of at most {MAX_WINDOWS} windows")
        return cls(drift=tuple(DriftSummary.from_dict(x) for x in drift))

    @classmethod
    def from_windows(cls, windows: Iterable[DriftWindow]) -> DriftWindows:
        """Summarise ``DriftMonitor`` windows (the caller keeps at most ``MAX_WINDOWS``)."""
        return cls(drift=tuple(DriftSummary.from_window(w) for w in windows))
