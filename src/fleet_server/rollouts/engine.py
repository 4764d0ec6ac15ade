"""The quality-gated rollout engine: policy, rollout state and ``decide`` (pure).

A rollout moves one model from ``from_version`` to ``to_version`` on the devices a selector
matches (a group or tags), in waves: a canary (fraction or count), then fixed ``steps`` or
``exponential`` growth up to every device. Membership is a prefix of the devices sorted by a
stable hash of ``model`` and device id, so a re-run picks the same canaries and a wave only adds.

State machine::

    pending -> dwelling -> judging -> [awaiting_approval] -> dwelling (next wave) ... -> completed
    any active state -> paused (breach with on_breach=pause, or operator) -> resume -> dwelling
    any active or paused state -> aborted (breach with on_breach=abort, or operator)

Gates (``fleet_server.rollouts.gates``): safety gates (install failures, device-initiated
rollbacks) are judged at every step; quality gates (canary against the control group: reject and
fallback rates, output drift, shadow agreement, p99 latency) after the dwell time.

A breach pauses or aborts per policy; an abort sends members back to ``from_version`` when
``rollback_on_abort``; the ``quarantine_after``-th abort of a version (a gate's or an
operator's; 2 by default) quarantines it at once. A device that failed or rolled back is never
assigned the version again by this rollout.

Memory of failure (``fleet_server.rollouts.admission.admit``): a quarantined version, or one a
rollout already aborted, is not rolled out again unless the operator overrides it with a
reason, which the new rollout records (``Rollout.overrides``) and the version's history shows.

Pure: values in, a ``Decision`` out; the clock is passed in. Owns the policy, the state types,
``decide`` and the operator commands; does not own the gate verdicts
(``fleet_server.rollouts.gates``, whose ``GateResult`` is re-exported here), the I/O
(``fleet_server.jobs.rollout_runner``) or storage (``fleet_server.registry.rollouts`` stores a
``Rollout`` as JSON).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Final

from fleet_server.errors import RolloutPolicyError, RolloutStateError
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.gates import GateResult, quality_gates, safety_gates
from fleet_server.rollouts.metrics import DeviceObservation

__all__ = [
    "ACTIVE_STATES",
    "STATES",
    "Decision",
    "GateResult",
    "Rollout",
    "RolloutPolicy",
    "Selector",
    "Thresholds",
    "abort",
    "approve",
    "decide",
    "pause",
    "resume",
    "wave_order",
]

STATES: Final = (
    "pending",
    "dwelling",
    "judging",
    "awaiting_approval",
    "paused",
    "completed",
    "aborted",
)
ACTIVE_STATES: Final = frozenset({"pending", "dwelling", "judging", "awaiting_approval"})
ON_BREACH: Final = ("pause", "abort")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RolloutPolicyError(message)


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds; None disables a quality gate. Rates are fractions (0.02 = 2 points)."""

    max_install_failure_rate: float = 0.2
    max_rollback_rate: float = 0.1
    max_reject_rate_increase: float | None = 0.02
    max_fallback_rate_increase: float | None = 0.05
    max_drift_alert_share: float | None = 0.5
    min_shadow_agreement: float | None = None
    max_p99_latency_ratio: float | None = 1.5
    min_p99_latency_delta_ms: float = 2.0

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (a rate outside [0, 1] or a ratio below 1)."""
        for name in (
            "max_install_failure_rate",
            "max_rollback_rate",
            "max_reject_rate_increase",
            "max_fallback_rate_increase",
            "max_drift_alert_share",
            "min_shadow_agreement",
        ):
            v = getattr(self, name)
            _check(v is None or 0.0 <= v <= 1.0, f"{name} must be in [0, 1]")
        r = self.max_p99_latency_ratio
        _check(r is None or r >= 1.0, "max_p99_latency_ratio must be >= 1")
        d = self.min_p99_latency_delta_ms
        _check(
            isinstance(d, int | float) and math.isfinite(d) and d >= 0.0,
            "min_p99_latency_delta_ms must be a number >= 0",
        )


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
    on_breach: str = "pause"
    rollback_on_abort: bool = True
    quarantine_after: int = 2
    z: float = 1.645  # one-sided 95 %

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
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RolloutPolicy:
        """Parse (missing keys take defaults). Raises: RolloutPolicyError."""
        unknown = set(d) - {*_POLICY_KEYS, "thresholds"}
        _check(not unknown, f"unknown policy field(s): {sorted(unknown)}")
        t = d.get("thresholds") or {}
        _check(isinstance(t, Mapping), "thresholds must be an object")
        assert isinstance(t, Mapping)
        _check(not set(t) - set(_THRESHOLD_KEYS), f"unknown threshold(s): {sorted(t)}")
        kwargs = {k: d[k] for k in _POLICY_KEYS if k in d}
        if "steps" in kwargs:
            _check(isinstance(kwargs["steps"], list | tuple), "steps must be a list")
            kwargs["steps"] = tuple(kwargs["steps"])  # type: ignore[arg-type]
        try:
            return cls(thresholds=Thresholds(**t), **kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise RolloutPolicyError(f"invalid policy: {exc}") from exc


_POLICY_KEYS: Final = tuple(k for k in RolloutPolicy.__dataclass_fields__ if k != "thresholds")
_THRESHOLD_KEYS: Final = tuple(Thresholds.__dataclass_fields__)


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: a group, or devices carrying every given tag."""

    group: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError (neither or both of group and tags)."""
        _check((self.group is None) != (not self.tags), "select by exactly one of group or tags")

    def matches(self, group: str, tags: Mapping[str, object]) -> bool:
        """True when a device of ``group`` with ``tags`` is targeted."""
        if self.group is not None:
            return group == self.group
        return all(str(tags.get(k)) == v and k in tags for k, v in self.tags.items())

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        return {"group": self.group, "tags": dict(self.tags)}

    def __str__(self) -> str:
        if self.group is not None:
            return f"group={self.group}"
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))


@dataclass(frozen=True)
class Rollout:
    """A rollout's whole state (persisted as ``to_dict``; see the module docstring).

    ``members`` maps each device the rollout assigned ``to_version`` to when it did;
    ``failed``/``rolled_back`` are members that failed to install or went back on their own;
    ``acknowledged`` are those an operator's resume accepted (no longer counted by the gates);
    ``reverted`` are devices the rollout sent back to ``from_version``; ``overrides`` are
    the operator's recorded reasons to roll out a quarantined or earlier aborted version.
    """

    id: str
    model: str
    from_version: int | None
    to_version: int
    selector: Selector
    policy: RolloutPolicy
    created_at: datetime
    state: str = "pending"
    wave: int = -1
    started_at: datetime | None = None
    wave_started_at: datetime | None = None
    updated_at: datetime | None = None
    members: Mapping[str, datetime] = field(default_factory=dict)
    failed: tuple[str, ...] = ()
    rolled_back: tuple[str, ...] = ()
    acknowledged: tuple[str, ...] = ()
    reverted: tuple[str, ...] = ()
    approved_wave: int = -1
    breached: bool = False
    gates: tuple[GateResult, ...] = ()
    reasons: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    @property
    def active(self) -> bool:
        """Still moving (not paused, completed or aborted)."""
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class Decision:
    """What to do now: assign ``assign`` to ``to_version``, ``revert`` to ``from_version``."""

    rollout: Rollout
    assign: tuple[str, ...] = ()
    revert: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    quarantine: bool = False


def wave_order(model: str, device_ids: Sequence[str]) -> list[str]:
    """Devices in rollout order: by SHA-256 of ``model`` and id (stable across runs)."""
    return sorted(
        set(device_ids), key=lambda d: (hashlib.sha256(f"{model}\0{d}".encode()).digest(), d)
    )


# --------------------------------------------------------------------------- decide
def decide(
    rollout: Rollout,
    devices: Sequence[DeviceObservation],
    now: datetime,
    *,
    previous_aborts: int = 0,
) -> Decision:
    """The next step of ``rollout`` given its targeted devices' observations at ``now``.

    Args:
        rollout: Current state.
        devices: One observation per targeted (non-revoked) device: members observed on
            ``to_version`` since their assignment, the others on ``from_version``.
        now: The current time (aware).
        previous_aborts: Earlier aborted rollouts of the same model version (any cause).

    Returns:
        The new state and the assignments to make; a rollout that is not active is returned
        unchanged.
    """
    r = rollout
    if not r.active:
        return Decision(r, reasons=(f"rollout is {r.state}",))
    by_id = {d.device_id: d for d in devices}
    order = wave_order(r.model, list(by_id))
    reasons: list[str] = []
    seen = [d for d in r.members if d in by_id]
    rolled = sorted({*r.rolled_back, *(d for d in seen if by_id[d].rolled_back)})
    failed = sorted({*r.failed, *(d for d in seen if by_id[d].install_failed)} - set(rolled))
    if new := sorted(set(rolled) - set(r.rolled_back)):
        reasons.append(f"device-initiated rollback of v{r.to_version} on {', '.join(new)}")
    if new := sorted(set(failed) - set(r.failed)):
        reasons.append(f"install of v{r.to_version} failed on {', '.join(new)}")
    r = replace(r, rolled_back=tuple(rolled), failed=tuple(failed), updated_at=now)
    if r.state == "pending":
        if not order:
            return _stay(r, (*reasons, "no device matches the selector yet"), ())
        return _enter_wave(r, 0, order, by_id, now, reasons)
    safety = safety_gates(r, by_id)
    if any(g.status == "breach" for g in safety):
        return _breach(r, safety, now, previous_aborts, reasons)
    if r.state == "dwelling":
        assert r.wave_started_at is not None
        elapsed = (now - r.wave_started_at).total_seconds()
        if elapsed < r.policy.dwell_seconds:
            msg = f"wave {r.wave + 1} dwelling {elapsed:.0f}/{r.policy.dwell_seconds:.0f} s"
            return _stay(r, (*reasons, msg), safety)
        r = replace(r, state="judging")
    if r.state == "judging":
        gates = (*safety, *quality_gates(r, by_id, order))
        if any(g.status == "breach" for g in gates):
            return _breach(r, gates, now, previous_aborts, reasons)
        waiting = [g.detail for g in gates if g.status == "waiting"]
        if waiting:
            return _stay(r, (*reasons, *waiting), gates)
        reasons.append(f"wave {r.wave + 1} passed its gates")
        if all(d in r.members for d in order):
            done = replace(r, state="completed", gates=gates, reasons=tuple(reasons))
            return Decision(done, reasons=(*reasons, "completed"))
        if r.policy.approval and r.approved_wave < r.wave:
            wait = f"waiting for approval of wave {r.wave + 2}"
            r = replace(r, state="awaiting_approval", gates=gates)
            return _stay(r, (*reasons, wait), gates)
        return _enter_wave(replace(r, gates=gates), r.wave + 1, order, by_id, now, reasons)
    # awaiting_approval
    if r.approved_wave >= r.wave:
        return _enter_wave(r, r.wave + 1, order, by_id, now, reasons)
    return _stay(r, (*reasons, f"waiting for approval of wave {r.wave + 2}"), r.gates)


def _stay(r: Rollout, reasons: Sequence[str], gates: Sequence[GateResult]) -> Decision:
    return Decision(replace(r, gates=tuple(gates), reasons=tuple(reasons)), reasons=tuple(reasons))


def _enter_wave(
    r: Rollout,
    n: int,
    order: Sequence[str],
    by_id: Mapping[str, DeviceObservation],
    now: datetime,
    reasons: list[str],
) -> Decision:
    sizes = r.policy.wave_sizes(len(order))
    target = sizes[min(n, len(sizes) - 1)]
    members = dict(r.members)
    count = sum(1 for d in order if d in members)
    new: list[str] = []
    for d in order:
        if count >= target:
            break
        if d not in members:
            new.append(d)
            members[d] = now
            count += 1
    # A device already running the version joins without a new desired-state document.
    assign = tuple(d for d in new if by_id[d].active_version != r.to_version)
    reasons.append(
        f"wave {n + 1}/{len(sizes)}: {len(new)} device(s) join v{r.to_version} "
        f"({count}/{len(order)} devices)"
    )
    nxt = replace(
        r,
        state="dwelling",
        wave=n,
        members=members,
        started_at=r.started_at or now,
        wave_started_at=now,
        reasons=tuple(reasons),
    )
    return Decision(nxt, assign=assign, reasons=tuple(reasons))


def _breach(
    r: Rollout,
    gates: Sequence[GateResult],
    now: datetime,
    previous_aborts: int,
    reasons: list[str],
) -> Decision:
    reasons.extend(f"gate {g.name} breached: {g.detail}" for g in gates if g.status == "breach")
    r = replace(r, gates=tuple(gates), breached=True)
    if r.policy.on_breach == "pause":
        reasons.append("paused (on_breach=pause); devices stay where they are")
        return _stay(replace(r, state="paused"), reasons, gates)
    return _abort(r, now, reasons, previous_aborts, breach=True)


def _abort(
    r: Rollout, now: datetime, reasons: list[str], previous_aborts: int, *, breach: bool
) -> Decision:
    revert: tuple[str, ...] = ()
    if r.policy.rollback_on_abort and r.from_version is not None:
        revert = tuple(sorted(d for d in r.members if d not in r.reverted))
        reasons.append(f"aborted: {len(revert)} device(s) sent back to v{r.from_version}")
    else:
        reasons.append("aborted: devices stay where they are")
    # Every abort counts (a gate's or an operator's): a version aborted quarantine_after times
    # is quarantined at once, whoever stopped it.
    quarantine = previous_aborts + 1 >= r.policy.quarantine_after
    if quarantine:
        reasons.append(
            f"{r.model} v{r.to_version} quarantined after {previous_aborts + 1} aborted rollout(s)"
        )
    done = replace(
        r,
        state="aborted",
        reverted=tuple(sorted({*r.reverted, *revert})),
        updated_at=now,
        reasons=tuple(reasons),
    )
    return Decision(done, revert=revert, reasons=tuple(reasons), quarantine=quarantine)


# --------------------------------------------------------------------------- gates
# --------------------------------------------------------------------------- commands
def approve(r: Rollout, now: datetime) -> Rollout:
    """Approve the next wave (ahead of time too). Raises: RolloutStateError (not active)."""
    if not r.active:
        raise RolloutStateError(f"rollout {r.id} is {r.state}: nothing to approve")
    return replace(r, approved_wave=max(r.wave, 0), updated_at=now)


def pause(r: Rollout, now: datetime, reason: str = "paused by operator") -> Rollout:
    """Stop growing; devices stay where they are. Raises: RolloutStateError (not active)."""
    if not r.active:
        raise RolloutStateError(f"rollout {r.id} is {r.state}: cannot pause")
    return replace(r, state="paused", updated_at=now, reasons=(reason,))


def resume(r: Rollout, now: datetime) -> Rollout:
    """Continue a paused rollout: the current wave dwells again, seen failures are accepted.

    Raises:
        RolloutStateError: the rollout is not paused.
    """
    if r.state != "paused":
        raise RolloutStateError(f"rollout {r.id} is {r.state}: only a paused rollout resumes")
    if r.wave < 0:
        return replace(r, state="pending", updated_at=now, reasons=("resumed",))
    ack = tuple(sorted({*r.acknowledged, *r.failed, *r.rolled_back}))
    return replace(
        r,
        state="dwelling",
        wave_started_at=now,
        acknowledged=ack,
        breached=False,
        updated_at=now,
        reasons=(f"resumed; {len(ack)} failed or rolled-back device(s) accepted",),
    )


def abort(
    r: Rollout, now: datetime, reason: str = "aborted by operator", *, previous_aborts: int = 0
) -> Decision:
    """Stop for good; members go back to ``from_version`` if the policy says so.

    ``previous_aborts`` counts earlier aborted rollouts of the version: this abort quarantines
    it when it is the policy's ``quarantine_after``-th.

    Raises:
        RolloutStateError: the rollout is already completed or aborted.
    """
    if r.state in ("completed", "aborted"):
        raise RolloutStateError(f"rollout {r.id} is {r.state}: cannot abort")
    return _abort(r, now, [reason], previous_aborts, breach=False)
