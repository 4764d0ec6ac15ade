"""The quality-gated rollout engine: the state machine ``decide`` and the operator commands (pure).

A rollout moves one model from ``from_version`` to ``to_version`` on the devices a selector
matches (a group or tags), in waves: a canary (fraction or count), then fixed ``steps`` or
``exponential`` growth up to every device. Membership is a prefix of the devices sorted by a
stable hash of ``model`` and device id, so a re-run picks the same canaries and a wave only adds.

State machine::

    pending -> [shadow phase: dwelling -> judging ->] dwelling -> judging -> [awaiting_approval]
        -> dwelling (next wave) ... -> completed
    any active state -> paused (breach with on_breach=pause, or operator) -> resume -> dwelling
    any active or paused state -> aborted (breach with on_breach=abort, or operator)

Gates (``fleet_server.rollouts.gates``): ``decide`` runs every registered gate
(``fleet_server.rollouts.gates.GATES``) of the ``safety`` phase at every step and those of the
``quality`` phase (canary against the control group) after the dwell time, and acts on their
verdicts (``breach``, ``waiting``, ``ok``, ``skipped``) without knowing any gate by name.

Shadow phase (``Rollout.phase``): when ``decide`` is given ``ShadowInputs`` (the runner gives
them when the policy's ``shadow_fraction`` is set and the candidate is a classifier), a rollout
starts by sending the candidate as a *shadow* (installed, not serving, replayed on
``shadow_fraction`` of requests) to the canary wave's devices that advertise the capability
(``Decision.shadow``); devices that do not (older agents) get no shadow phase and serve as
canaries only once it passed. After ``shadow_dwell_seconds`` the ``shadow`` gates judge the
canaries' live-vs-shadow answers; a breach halts (pauses or aborts) before any canary serves, a
pass enters the canary wave. A canary wave without a capable device, or a rollout given no
``ShadowInputs``, has no shadow phase.

Holds (``fleet_server.rollouts.holds``): given ``HoldInputs``, every assignment ``decide`` makes
is sent only inside the device's maintenance window and within the policy's disruption budget;
the others wait in ``Rollout.held`` and go out at a later step. A wave with held members keeps
dwelling, its clock restarting, until the last of them is sent.

A breach pauses or aborts per policy; an abort sends members back to ``from_version`` when
``rollback_on_abort`` (never for an agent release: ``Rollout.agent``; devices refuse an older
agent, so its members' way back is their launcher's return or a newer release); the
``quarantine_after``-th abort of a version (a gate's or an operator's; 2 by default)
quarantines it at once. A device that failed or rolled back is never
assigned the version again by this rollout.

Memory of failure (``fleet_server.rollouts.admission.admit``): a quarantined version, or one a
rollout already aborted, is not rolled out again unless the operator overrides it with a
reason, which the new rollout records (``Rollout.overrides``) and the version's history shows.

Pure: values in, a ``Decision`` out; the clock is passed in. Owns ``decide``, the wave order
and the operator commands; does not own the policy (``fleet_server.rollouts.policy``), the
state types (``fleet_server.rollouts.state``; callers import both from there, not from here),
the gate verdicts (``fleet_server.rollouts.gates``), the I/O (``fleet_server.jobs.rollout_runner``)
or storage (``fleet_server.registry.rollouts`` stores a ``Rollout`` as JSON).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from fleet_server.errors import RolloutStateError
from fleet_server.rollouts.gates import GATES, Gate, GateInputs, quality_inputs, safety_inputs
from fleet_server.rollouts.holds import HoldInputs, apply_holds, hold_summary
from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.shadow_evidence import ShadowEvidence, ShadowInputs
from fleet_server.rollouts.state import Decision, GateResult, Rollout

__all__ = [
    "abort",
    "approve",
    "decide",
    "pause",
    "resume",
    "wave_order",
]


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
    gates: Sequence[Gate] = GATES,
    shadow: ShadowInputs | None = None,
    holds: HoldInputs | None = None,
) -> Decision:
    """The next step of ``rollout`` given its targeted devices' observations at ``now``.

    Args:
        rollout: Current state.
        devices: One observation per targeted (non-revoked) device: members observed on
            ``to_version`` since their assignment, the others on ``from_version``.
        now: The current time (aware).
        previous_aborts: Earlier aborted rollouts of the same model version (any cause).
        gates: The gates to judge (the registry, ``fleet_server.rollouts.gates.GATES``, by
            default): the ``safety`` ones at every step, the ``quality`` ones after the dwell,
            the ``shadow`` ones after the shadow phase's dwell.
        shadow: Who can take a shadow and the shadowed canaries' evidence; None: no shadow
            phase (a rollout already in one judges no evidence and waits).
        holds: Targeted devices' labels and closed maintenance windows; None: no window
            applies (with no disruption budget nothing is held).

    Returns:
        The new state and the assignments to make; a rollout that is not active is returned
        unchanged.
    """
    if not rollout.active:
        return Decision(rollout, reasons=(f"rollout is {rollout.state}",))
    by_id = {d.device_id: d for d in devices}
    order = wave_order(rollout.model, list(by_id))
    decision = _decide(rollout, by_id, order, now, previous_aborts, gates, shadow, holds)
    return apply_holds(decision, order, by_id, now, holds)


def _decide(
    r: Rollout,
    by_id: Mapping[str, DeviceObservation],
    order: Sequence[str],
    now: datetime,
    previous_aborts: int,
    gates: Sequence[Gate],
    shadow: ShadowInputs | None,
    holds: HoldInputs | None,
) -> Decision:
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
        first = _shadow_canaries(r, order, by_id, shadow)
        if first:
            return _enter_shadow(r, first, now, reasons)
        return _enter_wave(r, 0, order, by_id, now, reasons)
    safety = _judge(gates, "safety", safety_inputs(r, by_id))
    if any(g.status == "breach" for g in safety):
        return _breach(r, safety, now, previous_aborts, reasons)
    if r.phase == "shadow" and r.state in ("dwelling", "judging"):
        return _shadow_step(r, order, by_id, now, gates, shadow, safety, previous_aborts, reasons)
    if r.state == "dwelling" and r.held:
        msg = f"wave {r.wave + 1} waits for its held devices to be sent"
        return _stay(
            r, (*reasons, msg, hold_summary(r.held, holds.opens_at if holds else {})), safety
        )
    if r.state == "dwelling":
        assert r.wave_started_at is not None
        elapsed = (now - r.wave_started_at).total_seconds()
        if elapsed < r.policy.dwell_seconds:
            msg = f"wave {r.wave + 1} dwelling {elapsed:.0f}/{r.policy.dwell_seconds:.0f} s"
            return _stay(r, (*reasons, msg), safety)
        r = replace(r, state="judging")
    if r.state == "judging":
        inputs = quality_inputs(r, by_id, order)
        quality = (inputs,) if isinstance(inputs, GateResult) else _judge(gates, "quality", inputs)
        results = (*safety, *quality)
        if any(g.status == "breach" for g in results):
            return _breach(r, results, now, previous_aborts, reasons)
        waiting = [g.detail for g in results if g.status == "waiting"]
        if waiting:
            return _stay(r, (*reasons, *waiting), results)
        reasons.append(f"wave {r.wave + 1} passed its gates")
        if all(d in r.members for d in order):
            done = replace(r, state="completed", gates=results, reasons=tuple(reasons))
            return Decision(done, reasons=(*reasons, "completed"))
        if r.policy.approval and r.approved_wave < r.wave:
            wait = f"waiting for approval of wave {r.wave + 2}"
            r = replace(r, state="awaiting_approval", gates=results)
            return _stay(r, (*reasons, wait), results)
        return _enter_wave(replace(r, gates=results), r.wave + 1, order, by_id, now, reasons)
    # awaiting_approval
    if r.approved_wave >= r.wave:
        return _enter_wave(r, r.wave + 1, order, by_id, now, reasons)
    return _stay(r, (*reasons, f"waiting for approval of wave {r.wave + 2}"), r.gates)


def _shadow_canaries(
    r: Rollout,
    order: Sequence[str],
    by_id: Mapping[str, DeviceObservation],
    shadow: ShadowInputs | None,
) -> tuple[str, ...]:
    """The canary wave's devices that take the candidate as a shadow (empty: no shadow phase)."""
    if shadow is None or not shadow.classification or r.policy.shadow_fraction is None:
        return ()
    if r.from_version is None or r.phase != "serving" or r.shadows:
        return ()  # nothing to compare with, or the shadow phase already ran
    sizes = r.policy.wave_sizes(len(order))
    canary = order[: sizes[0]] if sizes else []
    return tuple(
        d for d in canary if d in shadow.capable and by_id[d].active_version == r.from_version
    )


def _enter_shadow(
    r: Rollout, devices: Sequence[str], now: datetime, reasons: list[str]
) -> Decision:
    fraction = r.policy.shadow_fraction or 0.0
    reasons.append(
        f"shadow phase: {len(devices)} canary device(s) run v{r.to_version} as a shadow of "
        f"v{r.from_version} on {fraction:.0%} of requests (not serving)"
    )
    nxt = replace(
        r,
        state="dwelling",
        phase="shadow",
        shadows=dict.fromkeys(devices, now),
        started_at=r.started_at or now,
        wave_started_at=now,
        reasons=tuple(reasons),
    )
    return Decision(nxt, shadow=tuple(devices), reasons=tuple(reasons))


def _shadow_step(
    r: Rollout,
    order: Sequence[str],
    by_id: Mapping[str, DeviceObservation],
    now: datetime,
    gates: Sequence[Gate],
    shadow: ShadowInputs | None,
    safety: Sequence[GateResult],
    previous_aborts: int,
    reasons: list[str],
) -> Decision:
    """Dwell, then judge the ``shadow`` gates; pass: the canary wave serves."""
    assert r.wave_started_at is not None
    elapsed = (now - r.wave_started_at).total_seconds()
    dwell = r.policy.shadow_dwell_seconds
    if r.state == "dwelling" and elapsed < dwell:
        msg = f"shadow phase dwelling {elapsed:.0f}/{dwell:.0f} s"
        return _stay(r, (*reasons, msg), safety)
    r = replace(r, state="judging")
    evidence = ShadowEvidence.total(
        e for d, e in (shadow.devices if shadow else {}).items() if d in r.shadows
    )
    inputs = GateInputs(rollout=r, devices=by_id, shadow=evidence)
    results = (*safety, *_judge(gates, "shadow", inputs))
    if any(g.status == "breach" for g in results):
        return _breach(r, results, now, previous_aborts, reasons)
    waiting = [g.detail for g in results if g.status == "waiting"]
    if waiting:
        return _stay(r, (*reasons, *waiting), results)
    reasons.append("shadow phase passed: the canary wave serves")
    served = replace(r, phase="serving", gates=results)
    return _enter_wave(served, 0, order, by_id, now, reasons)


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
    if r.agent:
        # A device refuses an agent release older than the one it runs (anti-rollback): the
        # way back from a bad release is its launcher's own return (the members whose trial
        # failed already took it) or a newer release, never an assignment of the old one.
        reasons.append(
            "aborted: agent release members stay where they are (an older agent release is "
            "never sent; devices whose trial failed are back on their previous release)"
        )
    elif r.policy.rollback_on_abort and r.from_version is not None:
        # A held member never received the version: nothing to send back.
        revert = tuple(sorted(d for d in r.members if d not in r.reverted and d not in r.held))
        reasons.append(f"aborted: {len(revert)} device(s) sent back to v{r.from_version}")
    else:
        reasons.append("aborted: devices stay where they are")
    # Shadows never served: they are withdrawn whatever the policy says about rollback.
    withdraw = sorted(set(r.shadows) - set(r.members) - set(r.reverted) - set(revert))
    if withdraw and r.from_version is not None:
        revert = tuple(sorted({*revert, *withdraw}))
        reasons.append(f"shadow of v{r.to_version} withdrawn from {len(withdraw)} device(s)")
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
        held={},
        reverted=tuple(sorted({*r.reverted, *revert})),
        updated_at=now,
        reasons=tuple(reasons),
    )
    return Decision(done, revert=revert, reasons=tuple(reasons), quarantine=quarantine)


def _judge(gates: Sequence[Gate], phase: str, inputs: GateInputs) -> tuple[GateResult, ...]:
    return tuple(g.verdict(inputs) for g in gates if g.phase == phase)


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
    if r.wave < 0 and r.phase != "shadow":  # a paused shadow phase dwells and is judged again
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
