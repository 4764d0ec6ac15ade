"""Decision rules several gates share: a share of members, and a rate increase over control.

Owns ``member_share`` (the safety gates' rule: a share of the wave's members with a bad outcome,
judged "certain" or by its Wilson lower bound) and ``rate_increase`` (the canary's rate against
the control group's by a one-sided two-proportion test, with the ``disabled``, ``no control``
and ``too few requests`` answers every such gate gives). Does not own the statistics themselves
(``fleet_server.rollouts.metrics``) nor which gate uses which rule (one module per gate).
"""

from __future__ import annotations

from collections.abc import Collection

from edge_agent.quality.confusion import wilson_interval
from fleet_server.rollouts.gates.base import GateInputs
from fleet_server.rollouts.metrics import one_sided_increase
from fleet_server.rollouts.state import GateResult

__all__ = ["member_share", "rate_increase"]


def member_share(i: GateInputs, name: str, bad: Collection[str], limit: float) -> GateResult:
    """A safety verdict: ``bad`` members (not accepted by an operator) against ``limit``.

    Breach when the bad share is certain to end above ``limit`` (above it even if every other
    member succeeds, with at least two bad members or every member bad), or when its Wilson
    lower bound among the finished members (failed, rolled back, or serving the new version)
    exceeds it with at least ``min_devices`` finished.
    """
    r = i.rollout
    ack = set(r.acknowledged)
    counted = [d for d in r.members if d not in ack]
    bad_all = {*r.failed, *r.rolled_back} - ack
    # Finished: failed, rolled back, or serving the new version; the rest may still install.
    finished = sum(
        1
        for d in counted
        if d in bad_all or (d in i.devices and i.devices[d].active_version == r.to_version)
    )
    k, n = len(set(bad) - ack), len(counted)
    lo, _ = wilson_interval(k, finished, r.policy.z)
    # Certain: above the limit even if every other member succeeds. One device of several
    # fails for its own reasons now and then (disk, power, a flaky link) and alone never
    # halts a wave (bench/bench_false_halts.py): it takes two, or every member.
    certain = n > 0 and k / n > limit and (k >= 2 or k == n)
    confident = finished >= r.policy.min_devices and lo > limit
    rate = k / n if n else 0.0
    detail = f"{k}/{n} members ({rate:.1%}; {finished} finished) vs max {limit:.1%}"
    return GateResult(name, "breach" if certain or confident else "ok", rate, limit, detail)


def rate_increase(
    i: GateInputs,
    name: str,
    canary: tuple[int, int],
    control: tuple[int, int],
    limit: float | None,
    *,
    min_count: int = 0,
) -> GateResult:
    """A quality verdict: the canary's rate ``x/n`` exceeds the control's by more than ``limit``.

    ``skipped`` when disabled (``limit`` None) or without a control group; ``waiting`` with
    fewer than the policy's ``min_requests`` on either side; else a breach when the increase
    is above ``limit`` at the policy's one-sided ``z`` and the canary has at least
    ``min_count`` events.
    """
    p = i.rollout.policy
    (x1, n1), (x2, n2) = canary, control
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if not i.has_control:
        return GateResult(name, "skipped", None, limit, "no control group left")
    if min(n1, n2) < p.min_requests:
        msg = f"{name}: {n1}/{n2} requests (canary/control), need {p.min_requests} each"
        return GateResult(name, "waiting", None, limit, msg)
    r1, r2 = x1 / n1, x2 / n2
    breach = x1 >= min_count and one_sided_increase(x1, n1, x2, n2, limit, p.z)
    detail = (
        f"{r1:.2%} on canary (n={n1}) vs {r2:.2%} on control (n={n2}): "
        f"{(r1 - r2) * 100:+.2f} points, max +{limit * 100:.2f}"
    )
    return GateResult(name, "breach" if breach else "ok", r1 - r2, limit, detail)
