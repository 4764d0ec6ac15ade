"""Rollout policy: how a rollout grows, when it stops, and the gates' thresholds (pure values).

Owns ``Thresholds`` (one validated field per gate threshold), ``OfflineLimits`` (how much worse
than the version it replaces a candidate may be on the model's evaluation set before the rollout
is refused), ``RolloutPolicy`` (waves, dwell,
minimum evidence, what a breach leads to; its JSON form ``to_dict``/``from_dict``, which the admin
API and the ``rollouts create`` options speak), ``DisruptionBudget`` (how many devices sharing a
label value may be mid-install or on probation at once) and ``Selector`` (which devices a
rollout targets: a group, tags or a label selector). Does not own the rollout state
(``fleet_server.rollouts.state``), the gate verdicts (``fleet_server.rollouts.gates``) nor
``decide`` (``fleet_server.rollouts.engine``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from edge_agent.wire.ops.labels import KEY
from fleet_server.errors import RolloutPolicyError
from fleet_server.rollouts.label_selector import LabelSelector

__all__ = [
    "ON_BREACH",
    "DisruptionBudget",
    "OfflineLimits",
    "RolloutPolicy",
    "Selector",
    "Thresholds",
]

ON_BREACH: Final = ("pause", "abort")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RolloutPolicyError(message)


def _rate(default: float | None) -> Any:
    """A rate threshold: a fraction in [0, 1], None where the gate may be turned off."""
    return field(default=default, metadata={"check": "rate"})


def _ratio(default: float | None) -> Any:
    """A ratio threshold: >= 1, None turns the gate off."""
    return field(default=default, metadata={"check": "ratio"})


def _count(default: int) -> Any:
    """A count threshold: an integer >= 1."""
    return field(default=default, metadata={"check": "count"})


def _ms(default: float) -> Any:
    """A duration threshold in ms: a finite number >= 0."""
    return field(default=default, metadata={"check": "ms"})


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds; None disables a quality gate. Rates are fractions (0.02 = 2 points).

    One field per threshold a gate reads (the gate names it in ``Gate.thresholds``); the field
    helper says how it is validated. A new gate's threshold is one line here.
    """

    max_install_failure_rate: float = _rate(0.2)
    max_rollback_rate: float = _rate(0.1)
    max_reject_rate_increase: float | None = _rate(0.02)
    max_fallback_rate_increase: float | None = _rate(0.05)
    max_drift_alert_share: float | None = _rate(0.5)
    min_shadow_agreement: float | None = _rate(None)
    max_p99_latency_ratio: float | None = _ratio(1.5)
    min_p99_latency_delta_ms: float = _ms(2.0)
    max_error_rate_increase: float | None = _rate(0.01)
    max_output_shift: float | None = _rate(0.1)
    max_ground_truth_drop: float | None = _rate(0.02)
    min_ground_truth_labels: int = _count(200)
    max_shadow_disagreement_excess: float | None = _rate(0.02)
    max_shadow_disagreement: float | None = _rate(0.05)
    min_shadow_rows: int = _count(300)

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (a rate outside [0, 1], a ratio below 1, a bad ms or
        count)."""
        for f in fields(self):
            v, check = getattr(self, f.name), f.metadata.get("check")
            if check == "rate":
                _check(v is None or 0.0 <= v <= 1.0, f"{f.name} must be in [0, 1]")
            elif check == "ratio":
                _check(v is None or v >= 1.0, f"{f.name} must be >= 1")
            elif check == "count":
                _check(type(v) is int and v >= 1, f"{f.name} must be an integer >= 1")
            elif check == "ms":
                _check(
                    isinstance(v, int | float) and math.isfinite(v) and v >= 0.0,
                    f"{f.name} must be a number >= 0",
                )


@dataclass(frozen=True)
class OfflineLimits:
    """The offline comparison before a rollout starts (``fleet_server.rollouts.offline``).

    ``enabled`` False skips it. A candidate is refused when, on the model's evaluation set, its
    accuracy is lower than the replaced version's by more than ``max_accuracy_drop``, or one
    class's recall by more than ``max_recall_drop`` (classes with at least
    ``min_class_samples`` samples), and the drop is significant on the paired answers
    (McNemar). A set of fewer than ``min_samples`` samples is compared and recorded, not judged.
    """

    enabled: bool = True
    max_accuracy_drop: float = _rate(0.01)
    max_recall_drop: float = _rate(0.05)
    min_samples: int = 50
    min_class_samples: int = 20

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (a drop outside [0, 1], a minimum below 1)."""
        _check(isinstance(self.enabled, bool), "offline.enabled must be true or false")
        for name in ("max_accuracy_drop", "max_recall_drop"):
            v = getattr(self, name)
            _check(
                isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                f"offline.{name} must be in [0, 1]",
            )
        for name in ("min_samples", "min_class_samples"):
            v = getattr(self, name)
            _check(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"offline.{name} must be an integer >= 1",
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        return {k: getattr(self, k) for k in _OFFLINE_KEYS}


_OFFLINE_KEYS: Final = tuple(OfflineLimits.__dataclass_fields__)


@dataclass(frozen=True)
class DisruptionBudget:
    """At most ``max_devices`` (or ``max_fraction`` of them, at least 1) of the targeted devices
    sharing a value of ``label`` are mid-install or on probation at once.

    A device counts from the moment its assignment is sent until it has served the new version
    for ``settle_seconds`` (the agent's default probation, 300 s) or failed or rolled back.
    Devices without the label share the budget of the missing value. Exactly one of
    ``max_devices`` and ``max_fraction`` is set.
    """

    label: str
    max_devices: int | None = None
    max_fraction: float | None = None
    settle_seconds: float = 300.0

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (a bad label key, neither or both limits, bad values)."""
        _check(isinstance(self.label, str) and bool(KEY.fullmatch(self.label)), "budget label")
        _check(
            (self.max_devices is None) != (self.max_fraction is None),
            "disruption_budget: give exactly one of max_devices and max_fraction",
        )
        n, f = self.max_devices, self.max_fraction
        _check(
            n is None or (type(n) is int and n >= 1), "disruption_budget.max_devices must be >= 1"
        )
        _check(
            f is None or (isinstance(f, int | float) and 0.0 < f <= 1.0),
            "disruption_budget.max_fraction must be in (0, 1]",
        )
        _check(
            isinstance(self.settle_seconds, int | float)
            and math.isfinite(self.settle_seconds)
            and self.settle_seconds >= 0,
            "disruption_budget.settle_seconds must be >= 0",
        )

    def limit(self, sharing: int) -> int:
        """Devices of a label value with ``sharing`` targeted devices that may be disrupted."""
        if self.max_devices is not None:
            return self.max_devices
        return max(1, math.floor((self.max_fraction or 0.0) * sharing + 1e-9))

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        return {k: getattr(self, k) for k in _BUDGET_KEYS}

    @classmethod
    def from_dict(cls, d: object) -> DisruptionBudget:
        """Parse. Raises: RolloutPolicyError."""
        _check(isinstance(d, Mapping), "disruption_budget must be an object")
        assert isinstance(d, Mapping)
        _check(not set(d) - set(_BUDGET_KEYS), f"unknown budget field(s): {sorted(d)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise RolloutPolicyError(f"invalid disruption_budget: {exc}") from exc

    def __str__(self) -> str:
        limit = self.max_devices if self.max_devices is not None else f"{self.max_fraction:.0%}"
        return f"at most {limit} per {self.label}"


_BUDGET_KEYS: Final = tuple(DisruptionBudget.__dataclass_fields__)


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout grows and when it stops (see the module docstring)."""

    canary_fraction: float = 0.1
    canary_count: int | None = None
    steps: tuple[float, ...] = (0.25, 0.5, 1.0)
    exponential: float | None = None
    dwell_seconds: float = 300.0
    min_devices: int = 3
    min_requests: int = 100
    approval: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    offline: OfflineLimits = field(default_factory=OfflineLimits)
    on_breach: str = "pause"
    rollback_on_abort: bool = True
    quarantine_after: int = 2
    z: float = 1.645  # one-sided 95 %
    # The shadow phase (classifiers, canaries that support it): None turns it off.
    shadow_fraction: float | None = 0.25
    shadow_dwell_seconds: float = 120.0
    disruption_budget: DisruptionBudget | None = None

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (the message names the field)."""
        _check(0.0 < self.canary_fraction <= 1.0, "canary_fraction must be in (0, 1]")
        _check(self.canary_count is None or self.canary_count >= 1, "canary_count must be >= 1")
        _check(all(0.0 < s <= 1.0 for s in self.steps), "steps must be fractions in (0, 1]")
        _check(list(self.steps) == sorted(set(self.steps)), "steps must increase strictly")
        _check(self.exponential is None or self.exponential > 1.0, "exponential must be > 1")
        _check(self.dwell_seconds >= 0 and math.isfinite(self.dwell_seconds), "dwell_seconds")
        _check(self.min_devices >= 1, "min_devices must be >= 1")
        _check(self.min_requests >= 1, "min_requests must be >= 1")
        _check(self.on_breach in ON_BREACH, f"on_breach must be one of {ON_BREACH}")
        _check(self.quarantine_after >= 1, "quarantine_after must be >= 1")
        _check(self.z > 0, "z must be > 0")
        _check(
            self.shadow_fraction is None or 0.0 < self.shadow_fraction <= 1.0,
            "shadow_fraction must be in (0, 1] or null",
        )
        _check(
            self.shadow_dwell_seconds >= 0 and math.isfinite(self.shadow_dwell_seconds),
            "shadow_dwell_seconds",
        )

    def wave_sizes(self, n: int) -> tuple[int, ...]:
        """Cumulative members per wave for ``n`` devices: increasing, the last one is ``n``."""
        if n <= 0:
            return ()
        first = self.canary_count or math.ceil(self.canary_fraction * n - 1e-9)
        fractions: list[float] = []
        if self.exponential is not None:
            f = first / n
            while f < 1.0:
                f *= self.exponential
                fractions.append(min(f, 1.0))
        else:
            fractions = list(self.steps)
        sizes = [min(max(first, 1), n)]
        for f in [*fractions, 1.0]:
            k = min(max(math.ceil(f * n - 1e-9), 1), n)
            if k > sizes[-1]:
                sizes.append(k)
        return tuple(sizes)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        d = {k: getattr(self, k) for k in _POLICY_KEYS}
        d["steps"] = list(self.steps)
        d["thresholds"] = {k: getattr(self.thresholds, k) for k in _THRESHOLD_KEYS}
        d["offline"] = self.offline.to_dict()
        # Absent without a budget: a rollout stored before budgets existed reads back equal.
        if self.disruption_budget is not None:
            d["disruption_budget"] = self.disruption_budget.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RolloutPolicy:
        """Parse (missing keys take defaults: a policy stored before ``offline`` existed gets
        the default offline limits). Raises: RolloutPolicyError."""
        unknown = set(d) - {*_POLICY_KEYS, "thresholds", "offline", "disruption_budget"}
        _check(not unknown, f"unknown policy field(s): {sorted(unknown)}")
        t = d.get("thresholds") or {}
        _check(isinstance(t, Mapping), "thresholds must be an object")
        assert isinstance(t, Mapping)
        _check(not set(t) - set(_THRESHOLD_KEYS), f"unknown threshold(s): {sorted(t)}")
        o = d.get("offline")
        o = {} if o is None else o
        _check(isinstance(o, Mapping), "offline must be an object")
        assert isinstance(o, Mapping)
        _check(not set(o) - set(_OFFLINE_KEYS), f"unknown offline limit(s): {sorted(o)}")
        kwargs: dict[str, Any] = {k: d[k] for k in _POLICY_KEYS if k in d}
        if d.get("disruption_budget") is not None:
            kwargs["disruption_budget"] = DisruptionBudget.from_dict(d["disruption_budget"])
        if "steps" in kwargs:
            _check(isinstance(kwargs["steps"], list | tuple), "steps must be a list")
            kwargs["steps"] = tuple(kwargs["steps"])
        try:
            return cls(
                thresholds=Thresholds(**t),
                offline=OfflineLimits(**o),
                **kwargs,
            )
        except TypeError as exc:
            raise RolloutPolicyError(f"invalid policy: {exc}") from exc


_POLICY_KEYS: Final = tuple(
    k
    for k in RolloutPolicy.__dataclass_fields__
    if k not in ("thresholds", "offline", "disruption_budget")
)
_THRESHOLD_KEYS: Final = tuple(Thresholds.__dataclass_fields__)


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: a group, devices carrying every given tag, or devices
    whose labels a label selector matches (re-evaluated at every step, so devices that start
    matching join the rollout and devices that stop matching leave its targets)."""

    group: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    labels: LabelSelector | None = None

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (not exactly one of group, tags and labels)."""
        given = (self.group is not None) + bool(self.tags) + (self.labels is not None)
        _check(given == 1, "select by exactly one of group, tags or a label selector")

    def matches(
        self, group: str, tags: Mapping[str, object], labels: Mapping[str, str] | None = None
    ) -> bool:
        """True when a device of ``group`` with ``tags`` and ``labels`` is targeted."""
        if self.group is not None:
            return group == self.group
        if self.labels is not None:
            return self.labels.matches(labels or {})
        return all(str(tags.get(k)) == v and k in tags for k, v in self.tags.items())

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict (``labels`` only when set: stored rollouts from before read equal)."""
        out: dict[str, object] = {"group": self.group, "tags": dict(self.tags)}
        if self.labels is not None:
            out["labels"] = str(self.labels)
        return out

    def __str__(self) -> str:
        if self.group is not None:
            return f"group={self.group}"
        if self.labels is not None:
            return f"labels {self.labels}"
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))
