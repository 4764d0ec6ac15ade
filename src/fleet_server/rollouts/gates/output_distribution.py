"""The ``output_distribution`` gate (quality): the canary's outputs against the control's.

What it catches: a candidate that answers differently from the live model on the same traffic,
such as a training-label bug that maps part of one class to another. Such a candidate is as
fast, as confident (often more) and as free of rejects and fallbacks as a good one, and its own
drift baseline carries the bug, so no gate that compares a version with itself sees it. This
gate compares the two versions' outputs over the same period instead.

Evidence: every agent sketches each output tensor in tier-A drift windows; their per-feature
``count``, ``sum`` and ``sumsq`` merge exactly across windows, devices and rollups
(``fleet_server.rollouts.metrics.OutputMoments``). The runner merges them over the canary
members (each since it joined) and over two references: the control group (the devices still
on ``from_version``, since the rollout started) and the same canary members' ``from_version``
windows before they switched, over a window as long as the one they have served the
candidate for. The gate judges against every reference with enough rows and breaches only
when all of them see the shift: a small canary's devices see another mix of inputs than the
control group's (the control comparison alone would halt good candidates for it), and the
traffic of the hours before the switch is not the traffic of the hours after it (the
before-switch comparison alone would halt for that); a candidate that answers differently
shifts against both. When no control group is left (the last wave) the before-switch windows
judge alone, instead of skipping.

Statistic: for each output feature ``j`` (for a classifier's probabilities: class ``j``; its
mean is the share of the answers given to that class) the standardised mean difference
``d = (mean_canary - mean_reference) / s``, with ``s`` the pooled standard deviation. The
gate breaches when some feature's ``|d|`` exceeds ``max_output_shift`` (0.1 by default) with
confidence: ``(|d| - limit) / se(d) > z'``, where ``z'`` is the policy's one-sided ``z``
corrected by Bonferroni for the two-sided test of every feature (``2 * features`` tests), so
a 10-class output is tested at 0.25 % per side and class.

Why means and not a chi-square on the bins: the candidate's tier-A bins are fitted on its own
baseline, so its bins are not the live version's and a bin-by-bin table of the two does not
exist; and even with shared bins, the bins of a softmax sit at quantiles like 1e-7 and 1e-5,
where any retrained model differs from any other while answering the same. The mean of a
class probability ignores those tails and moves exactly when answers move between classes
(a label bug moving a tenth of the answers from class 3 to class 8 gives d of about 0.25 to
0.35 on both). The margin, not only significance, decides: with thousands of rows every
good candidate differs significantly by a hair, and devices differ in what they see, so a
small canary's mix is never exactly the control's (measured: bench/bench_false_halts.py).

Minimum sample: ``MIN_ROWS`` output rows (and the policy's ``min_requests``) on the canary
and on a reference; a reference with fewer rows is not judged (devices new to the fleet have
little history), and with none judged the wave waits. A pass needs the point estimates of
every feature within the limit on some reference (``|d| + Z_PASS * se < limit``; ``Z_PASS``
is 0); while neither a breach nor a pass is shown the wave waits for more rows (up to
``MAX_ROWS`` canary rows, then the point estimates decide). A wave is otherwise judged once,
right after its dwell, and a candidate past the limit but not yet beyond it with Bonferroni
confidence would pass on the small sample of that moment. ``Z_PASS`` is not higher because
every step a wave waits, every other quality gate is judged again: demanding confidence for a
pass held good candidates' canaries for ~15 more minutes at 1 request/s and tripled the other
gates' false halts (bench/bench_false_halts.py). No output window at all on the canary
or on both references (agents without an output baseline, history gone) skips the gate, as the
``prediction_drift`` gate does.

What it cannot catch: errors that keep the class shares (two equally frequent classes swapped
both ways, a uniformly noisier model), a candidate that is wrong only on inputs the canary did
not see; on the last wave, with no control group, a traffic change between the before-switch
window and the canary's looks like a shift. Owns this gate's definition only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.metrics import OutputMoments, TensorMoments
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE", "MAX_ROWS", "MIN_ROWS", "Z_PASS", "Shift", "corrected_z", "shifts"]

_NAME: Final = "output_distribution"
#: Output rows needed on each side before the gate judges.
MIN_ROWS: Final = 300
#: Canary rows after which an inconclusive comparison passes (judged on the point estimate).
MAX_ROWS: Final = 20_000
#: The confidence (one-sided z) with which a pass must show every feature within the limit
#: (0: the point estimates; see the module docstring).
Z_PASS: Final = 0.0
#: Features named in the message.
_SHOWN: Final = 3


@dataclass(frozen=True)
class Shift:
    """One output feature, canary against reference."""

    tensor: str
    feature: int
    canary_mean: float
    reference_mean: float
    d: float  # standardised mean difference (canary - reference) / pooled sd
    z: float  # (|d| - limit) / se(d): the evidence that |d| exceeds the limit
    se: float = 0.0  # standard error of d

    def within(self, limit: float, z: float) -> bool:
        """``|d|`` is below ``limit`` with confidence ``z`` (its upper bound is)."""
        return abs(self.d) + z * self.se < limit

    def label(self, single: bool) -> str:
        """``class 8`` for the only tensor, ``tensor[8]`` otherwise."""
        return f"class {self.feature}" if single else f"{self.tensor}[{self.feature}]"

    def text(self, single: bool) -> str:
        """``class 8: 9.8% -> 18.1% (d +0.23)``; plain means outside [0, 1]."""
        a, b = self.reference_mean, self.canary_mean
        if min(a, b) >= 0.0 and max(a, b) <= 1.0:
            values = f"{a:.1%} -> {b:.1%}"
        else:
            values = f"{a:.4g} -> {b:.4g}"
        return f"{self.label(single)}: {values} (d {self.d:+.2f})"


def _moments(t: TensorMoments, j: int) -> tuple[int, float, float]:
    n = t.count[j]
    if n <= 0:
        return 0, 0.0, 0.0
    mean = t.sum[j] / n
    return n, mean, max(t.sumsq[j] / n - mean * mean, 0.0)


def shifts(canary: OutputMoments, reference: OutputMoments, limit: float) -> list[Shift]:
    """Every shared output feature's shift, largest ``|d|`` first (pure).

    Tensors present on one side only, or with another feature count, are left out.
    """
    out: list[Shift] = []
    for name, c in sorted(canary.tensors.items()):
        r = reference.tensors.get(name)
        if r is None or len(r.count) != len(c.count):
            continue
        for j in range(len(c.count)):
            (n1, m1, v1), (n2, m2, v2) = _moments(c, j), _moments(r, j)
            if n1 == 0 or n2 == 0:
                continue
            s = math.sqrt((v1 + v2) / 2)
            if s == 0.0:
                # Constant on both sides: any difference is a whole distribution away.
                d = 0.0 if m1 == m2 else math.copysign(math.inf, m1 - m2)
                out.append(Shift(name, j, m1, m2, d, math.inf if d else -math.inf, 0.0))
                continue
            d = (m1 - m2) / s
            se = math.sqrt(v1 / n1 + v2 / n2) / s
            z = (abs(d) - limit) / se if se > 0 else (math.inf if abs(d) > limit else -math.inf)
            out.append(Shift(name, j, m1, m2, d, z, se))
    return sorted(out, key=lambda x: (-abs(x.d), x.tensor, x.feature))


def corrected_z(z: float, tests: int) -> float:
    """The one-sided ``z`` of the policy, Bonferroni-corrected for ``tests`` tests."""
    nd = NormalDist()
    spent = nd.cdf(-z) / max(tests, 1)  # the lower tail: exact where 1 - cdf(z) rounds to 0
    if spent <= 0.0:  # z beyond any float tail (policy z is only bounded below): no correction
        return z
    return max(z, -nd.inv_cdf(spent))


def verdict(i: GateInputs) -> GateResult:
    """The canary's output shift against every reference with enough rows; all must agree."""
    r, p = i.rollout, i.rollout.policy
    limit = p.thresholds.max_output_shift
    if limit is None:
        return GateResult(_NAME, "skipped", None, None, "disabled")
    refs: list[tuple[str, OutputMoments]] = []
    if i.has_control:
        refs.append((f"control on v{r.from_version}", i.control_outputs))
    refs.append((f"the same devices on v{r.from_version} before the switch", i.before_outputs))
    refs = [(what, m) for what, m in refs if m.rows > 0]
    n1 = i.canary_outputs.rows
    if n1 == 0:
        return GateResult(_NAME, "skipped", None, limit, "no output windows reported on canary")
    if not refs:
        what = "control or " if i.has_control else ""
        msg = f"no output windows of {what}the same devices before the switch"
        return GateResult(_NAME, "skipped", None, limit, msg)
    need = max(MIN_ROWS, p.min_requests)
    judged = [(what, m) for what, m in refs if m.rows >= need]
    if n1 < need or not judged:
        sides = ", ".join(f"{m.rows} on {what}" for what, m in refs)
        msg = f"{_NAME}: {n1} output rows on canary, {sides}; need {need}"
        return GateResult(_NAME, "waiting", None, limit, msg)
    found = [(what, m.rows, shifts(i.canary_outputs, m, limit)) for what, m in judged]
    found = [(what, n, f) for what, n, f in found if f]
    if not found:
        msg = f"no output tensor shared by the canary and {judged[0][0]}"
        return GateResult(_NAME, "skipped", None, limit, msg)
    z = corrected_z(p.z, 2 * max(len(f) for _w, _n, f in found))
    # Every reference must see the shift: the control group alone differs from a small canary
    # in what its devices see, the same devices before the switch alone in when they saw it.
    breach = all(any(s.z > z for s in f) for _w, _n, f in found)
    # A pass needs one reference within the limit on every feature; otherwise the wave waits
    # for rows, so a candidate past the limit is not let through on the first judgement's
    # small sample.
    clear = any(all(s.within(limit, Z_PASS) for s in f) for _w, _n, f in found)
    measured = min(abs(f[0].d) for _w, _n, f in found)
    single = len({s.tensor for _w, _n, f in found for s in f}) == 1
    parts = []
    for what, n, f in found:
        top = f[0]
        # The features that moved (at least the largest), not the ones that happen to come next.
        shown = [top, *(s for s in f[1:_SHOWN] if abs(s.d) >= limit / 2)]
        moved = ", ".join(s.text(single) for s in shown)
        parts.append(f"vs {what} (n={n}): |d| {abs(top.d):.2f}, evidence z {top.z:.1f}: {moved}")
    detail = (
        f"output shift |d| {measured:.2f} (max {limit:.2f}, evidence z above {z:.2f} for "
        f"{len(found[0][2])} features) on canary (n={n1}) " + "; ".join(parts)
    )
    if breach:
        return GateResult(_NAME, "breach", measured, limit, detail)
    if clear:
        return GateResult(_NAME, "ok", measured, limit, detail)
    if n1 >= MAX_ROWS:
        status = "breach" if measured > limit else "ok"
        return GateResult(_NAME, status, measured, limit, f"inconclusive after {n1} rows: {detail}")
    return GateResult(_NAME, "waiting", measured, limit, f"{_NAME} inconclusive: {detail}")


GATE: Final = Gate(
    name=_NAME,
    phase="quality",
    reads=("outputs", "outputs_before"),  # DeviceObservation fields, merged by quality_inputs
    statistic="standardised mean shift per output feature above a margin, Bonferroni z",
    thresholds=("max_output_shift",),
    verdict=verdict,
)
