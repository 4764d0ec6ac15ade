"""Holding assignments: maintenance windows and the disruption budget on a decision (pure).

Owns ``HoldInputs`` (per targeted device: its labels, and when its window next opens if it is
closed now) and ``apply_holds``, which ``decide`` runs on every decision of an active rollout:
every member whose assignment is due (new wave members and members held before, in wave order)
is sent only if its maintenance window is open and the disruption budget of its label value has
room; otherwise it is kept in ``Rollout.held`` with the reason, and sent at a later step.

Where windows are enforced: here, on the server. The server holds the assignment until the
device's window opens, so a device outside its window never receives a new desired state to act
on (nothing on the device has to know about windows; an older agent is covered too). Reverts
after an abort and shadows (staged, never serving) are not held: a revert returns to the kept
version without a download and must not wait a week.

A wave's dwell starts once its last held member is sent (``decide`` keeps a wave with held
members dwelling and restarts its clock while any is held), so every wave is judged on devices
that actually run the version; a device that starts matching the selector joins at the next
wave that is entered, never into a wave already judged.

The budget counts, per value of its label among the targeted devices, members whose assignment
was sent by this rollout and that have neither failed, rolled back, been sent back, nor served
the version for ``settle_seconds`` (``Rollout.released`` / ``Rollout.settling``, which keep
only the devices the budget still counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.state import ACTIVE_STATES, Decision, Rollout

__all__ = ["HoldInputs", "apply_holds", "disrupted"]


@dataclass(frozen=True)
class HoldInputs:
    """What holding needs: ``labels`` per targeted device (for the budget) and ``opens_at``
    for each targeted device whose maintenance window is closed now (absent: it may install)."""

    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    opens_at: Mapping[str, datetime] = field(default_factory=dict)


def disrupted(r: Rollout, now: datetime) -> set[str]:
    """Members sent by ``r`` that are mid-install or on probation at ``now``."""
    budget = r.policy.disruption_budget
    settle = budget.settle_seconds if budget is not None else 0.0
    gone = {*r.failed, *r.rolled_back, *r.reverted}
    return {
        d
        for d in r.released
        if d not in gone
        and not (d in r.settling and (now - r.settling[d]).total_seconds() >= settle)
    }


def apply_holds(
    decision: Decision,
    order: Sequence[str],
    by_id: Mapping[str, DeviceObservation],
    now: datetime,
    holds: HoldInputs | None,
) -> Decision:
    """``decision`` with its assignments held or released (see the module docstring).

    ``holds`` None: no windows and no budget apply; members held before are all released.
    """
    r = decision.rollout
    if not r.held and not r.released and holds is None:
        return decision
    holds = holds or HoldInputs()
    budget = r.policy.disruption_budget
    settling = dict(r.settling)
    for d in r.released:
        if d not in settling and d in by_id and by_id[d].active_version == r.to_version:
            settling[d] = now
    r = replace(r, settling=settling)
    # Only the budget reads ``released``/``settling``: keep just the devices it still counts,
    # so a rollout over a large fleet does not carry a second copy of its members.
    busy_now = disrupted(r, now) if budget is not None else set()
    r = replace(
        r,
        released={d: t for d, t in r.released.items() if d in busy_now},
        settling={d: t for d, t in settling.items() if d in busy_now},
    )
    if r.state not in ACTIVE_STATES:
        # Paused: the held stay held. Aborted: the engine already dropped them (never sent,
        # nothing to send back).
        return replace(decision, rollout=r)
    due = [d for d in order if d in r.held or d in decision.assign]
    if budget is None and not holds.opens_at and not r.held:
        return replace(decision, rollout=r)
    busy: dict[str, int] = {}
    sharing: dict[str, int] = {}
    if budget is not None:
        for d in order:
            v = holds.labels.get(d, {}).get(budget.label, "")
            sharing[v] = sharing.get(v, 0) + 1
        for d in disrupted(r, now):
            v = holds.labels.get(d, {}).get(budget.label, "")
            busy[v] = busy.get(v, 0) + 1
    held: dict[str, str] = {}
    sent: list[str] = []
    for d in due:
        if d in holds.opens_at:
            held[d] = "window"
            continue
        if budget is not None:
            v = holds.labels.get(d, {}).get(budget.label, "")
            if busy.get(v, 0) >= budget.limit(sharing.get(v, 1)):
                held[d] = "budget"
                continue
            busy[v] = busy.get(v, 0) + 1
        sent.append(d)
    # A device that stopped matching while held is dropped from the hold (not sent).
    released = {**r.released, **dict.fromkeys(sent if budget is not None else (), now)}
    reasons = list(decision.reasons)
    if newly := [d for d in sent if d in r.held]:
        reasons.append(f"{len(newly)} held device(s) sent v{r.to_version}: {', '.join(newly)}")
    if held:
        reasons.append(hold_summary(held, holds.opens_at))
    wave_started = r.wave_started_at
    if r.state == "dwelling" and r.phase == "serving" and (held or r.held):
        wave_started = now  # the dwell starts once the wave's last member was sent
    nxt = replace(
        r, held=held, released=released, wave_started_at=wave_started, reasons=tuple(reasons)
    )
    return replace(decision, rollout=nxt, assign=tuple(sent), reasons=tuple(reasons))


def hold_summary(held: Mapping[str, str], opens_at: Mapping[str, datetime]) -> str:
    """One line: how many wait for a window (and the earliest opening) or for the budget."""
    window = [d for d, why in held.items() if why == "window"]
    parts = []
    if window:
        first = min((opens_at[d] for d in window if d in opens_at), default=None)
        when = f", next opens {first.isoformat(timespec='minutes')}" if first else ""
        parts.append(f"{len(window)} wait for a maintenance window{when}")
    if n := len(held) - len(window):
        parts.append(f"{n} wait for the disruption budget")
    return "held: " + "; ".join(parts)
