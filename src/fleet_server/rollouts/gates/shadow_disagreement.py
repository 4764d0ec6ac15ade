"""The ``shadow_disagreement`` gate (shadow): do the canaries' shadows disagree more than expected?

In a rollout's shadow phase the canaries run the candidate as a shadow beside the live model and
report, per row compared, whether both answered the same class and which class flipped to which
(``fleet_server.rollouts.shadow_evidence``). The merged field disagreement is compared with the
disagreement the offline comparison measured between the same two versions on the model's
evaluation set (``Rollout.offline.disagreement``) plus ``max_shadow_disagreement_excess``
(2 points by default); without an offline figure, with ``max_shadow_disagreement`` (5 %).

It judges once ``min_shadow_rows`` rows were compared, and a verdict needs evidence either
way: it trips when the Wilson lower bound of the disagreement is above the limit, passes when
the upper bound (at the policy's ``z``) is at or below it, and otherwise waits for more rows,
until ``DECIDE_AT`` times the minimum, where the point estimate decides (a candidate a little
past the limit is not let through on a small sample, a good one is not held for ever).

The gate looks again at every report, so a breach bound at the policy's ``z`` alone would be
crossed by chance far more often than its nominal level (a candidate one point under the limit
was halted in 1.4 % of shadow phases). The breach bound spends the policy's one-sided level
``alpha`` over the doublings of the sample (alpha spending over epochs): with ``n`` rows in
epoch ``k = 1 + floor(log2(n / min_shadow_rows))`` the lower bound uses
``alpha / (k * (k + 1))``, so the epochs of a whole shadow phase spend at most ``alpha``
(``breach_z``).

A candidate whose shadow failed to install on too many canaries trips too, by the install
failure gate's rule (two and above ``max_install_failure_rate``, every one, or the Wilson
bound). The detail names the largest flips (``3 -> 8: 41``): which classes the candidate
answers differently. ``bench/bench_shadow_gate.py`` measures its halt rates (docs/rollouts.md).

What it catches: a candidate that is confidently wrong on a class (a labelling bug), with the
same inputs and confidence, before any canary serves it. What it cannot: a candidate that is
worse while agreeing with the live model (both wrong the same way), or a regression on inputs
the canaries do not see; and it measures *change*, not accuracy: a candidate that is better
than the live model by more than the margin also disagrees (the offline comparison's figure,
when there is one, is what makes such a change expected).

Owns this gate's definition only.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Final

from edge_agent.quality.confusion import wilson_interval
from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.state import GateResult

__all__ = ["DECIDE_AT", "GATE", "breach_z", "limit_of"]

_NAME: Final = "shadow_disagreement"
#: With this many times ``min_shadow_rows`` compared, the point estimate decides.
DECIDE_AT: Final = 10


def breach_z(z: float, compared: int, need: int) -> float:
    """The ``z`` of the breach bound after ``compared`` rows (alpha spent over sample doublings).

    ``z`` is the policy's one-sided level; ``need`` the minimum sample (the first epoch).
    """
    epoch = 1 + int(math.log2(max(compared, need) / max(need, 1)))
    alpha = NormalDist().cdf(-z)  # the lower tail: exact where 1 - cdf(z) rounds to 0
    spent = alpha / (epoch * (epoch + 1))
    if spent <= 0.0:  # z beyond any float tail (policy z is only bounded below): no correction
        return z
    return max(z, -NormalDist().inv_cdf(spent))


def limit_of(i: GateInputs) -> tuple[float | None, str]:
    """The disagreement the canaries may show, and where it comes from (for the message)."""
    t = i.rollout.policy.thresholds
    offline = i.rollout.offline
    expected = None if offline is None else offline.disagreement
    if expected is not None and t.max_shadow_disagreement_excess is not None:
        excess = t.max_shadow_disagreement_excess
        return (
            min(1.0, expected + excess),
            f"expected {expected:.1%} (offline) + {excess * 100:.1f} points",
        )
    if t.max_shadow_disagreement is None:
        return None, "disabled"
    return t.max_shadow_disagreement, "policy maximum (no offline comparison)"


def verdict(i: GateInputs) -> GateResult:
    """The shadowed canaries' disagreement against the expected one."""
    e, p = i.shadow, i.rollout.policy
    limit, source = limit_of(i)
    if limit is None:
        return GateResult(_NAME, "skipped", None, None, "disabled")
    if failed := _failed_installs(i):
        return failed
    need = p.thresholds.min_shadow_rows
    if e.compared < need:
        detail = f"{e.compared}/{need} rows compared in shadow on {e.devices} canary device(s)"
        return GateResult(_NAME, "waiting", float(e.compared), float(need), detail)
    share = e.disagreement or 0.0
    disagree = e.compared - e.agree
    lo, _ = wilson_interval(disagree, e.compared, breach_z(p.z, e.compared, need))
    _, hi = wilson_interval(disagree, e.compared, p.z)
    flips = e.top_flips()
    detail = (
        f"shadow disagrees on {disagree}/{e.compared} rows ({share:.1%}, "
        f"{lo:.1%}..{hi:.1%}) vs max {limit:.1%} ({source}) on {e.devices} canary device(s)"
        + (f"; top flips {flips}" if flips else "")
    )
    if lo > limit:
        return GateResult(_NAME, "breach", share, limit, detail)
    if hi <= limit:
        return GateResult(_NAME, "ok", share, limit, detail)
    if e.compared >= DECIDE_AT * need:
        status = "breach" if share > limit else "ok"
        return GateResult(_NAME, status, share, limit, f"{detail} (point estimate decides)")
    return GateResult(_NAME, "waiting", share, limit, f"{detail}: inconclusive, more rows")


def _failed_installs(i: GateInputs) -> GateResult | None:
    """A breach when the shadows that failed to install are too many, by the install-failure
    gate's rule (``max_install_failure_rate``: certain with two, or every one, or by the Wilson
    bound among those that finished), else None. One failure in a large canary is a device's
    own trouble (at 0.5 % per install, 2 of 20 happen now and then), not the candidate's."""
    e, p = i.shadow, i.rollout.policy
    k, n = len(e.failed), len(i.rollout.shadows)
    if not k:
        return None
    limit = p.thresholds.max_install_failure_rate
    finished = e.installed + k
    lo, _ = wilson_interval(k, finished, p.z)
    certain = k / max(n, 1) > limit and (k >= 2 or k >= n)
    if not certain and not (finished >= p.min_devices and lo > limit):
        return None
    names = ", ".join(f"{d} ({why})" for d, why in sorted(e.failed.items()))
    detail = f"shadow of v{i.rollout.to_version} failed on {k}/{n}: {names}"
    return GateResult(_NAME, "breach", float(k), limit, detail)


GATE: Final = Gate(
    name=_NAME,
    phase="shadow",
    reads=("shadows", "offline"),
    statistic="Wilson bounds of the canaries' disagreement (breach: alpha spent over looks) "
    "vs expected + margin",
    thresholds=(
        "max_shadow_disagreement_excess",
        "max_shadow_disagreement",
        "min_shadow_rows",
    ),
    verdict=verdict,
)
