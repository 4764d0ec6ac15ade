"""The shadow phase's gate: how often it halts good candidates, how soon it halts bad ones.

A Monte Carlo through the real verdict (``fleet_server.rollouts.gates.shadow_disagreement``)
with the DEFAULT policy (300 rows minimum, a 2-point margin over the offline comparison's
disagreement, 5 % without one, z = 1.645). Each trial draws the canaries' live-vs-shadow
disagreements row by row (binomial at the candidate's true field disagreement) in batches, as
reports arrive, and asks the gate after each batch until it says ``ok`` or ``breach`` (the shadow
phase ends at its first answer that is not ``waiting``). A good candidate's true field
disagreement equals the offline comparison's (or is below the policy maximum without one); a
confidently wrong one disagrees on most of one class (about 10 % of rows for the mislabelled
digits model, which answers 8 for 96 % of 3s).

    .venv/bin/python bench/bench_shadow_gate.py --trials 20000 --markdown

Also prints the rows (and time, at 5 requests/s per canary, 2 canaries, shadow fraction 25 %)
the gate needs before its verdict (median; the shadow dwell, 120 s by default, comes on top
when it is longer).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from edge_agent.quality.confusion import Confusion
from fleet_server.rollouts.gates import GateInputs
from fleet_server.rollouts.gates.shadow_disagreement import GATE
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.shadow_evidence import ShadowEvidence
from fleet_server.rollouts.state import OfflineCheck, Rollout

T0 = datetime(2026, 12, 7, tzinfo=UTC)
BATCH = 50  # rows per report interval over the canaries (30 s at 2 x 5 req/s x 25 %, ~75)
RATE = 2 * 5 * 0.25  # rows per second reaching the shadows (2 canaries, 5 req/s, 25 %)

CASES = (
    # (label, true field disagreement, offline disagreement or None)
    ("good, offline 1 %", 0.01, 0.01),
    ("good, offline 3 %", 0.03, 0.03),
    ("good, offline 8 %", 0.08, 0.08),
    ("good, no eval set, field 2 %", 0.02, None),
    ("good, no eval set, field 4 %", 0.04, None),
    ("bad (3s as 8s), offline 10 %", 0.10, 0.10),  # the eval set saw it: expected, not halted
    ("bad (3s as 8s), offline 1 %", 0.10, 0.01),  # field disagrees far more than expected
    ("bad (3s as 8s), no eval set", 0.10, None),
    ("half as bad, no eval set", 0.06, None),
)


def _rollout(offline: float | None) -> Rollout:
    check = None if offline is None else OfflineCheck("passed", n=1000, disagreement=offline)
    r = Rollout("ro", "digits", 1, 2, Selector(group="g"), RolloutPolicy(), T0, offline=check)
    return replace(r, phase="shadow", shadows={"a": T0, "b": T0})


def _evidence(n: int, disagree: int) -> ShadowEvidence:
    m = [[0, 0], [0, 0]]
    m[0][0], m[0][1] = n - disagree, disagree
    return ShadowEvidence(n, n - disagree, Confusion(tuple(tuple(r) for r in m)), devices=2)


def trial(r: Rollout, p: float, rng: np.random.Generator, max_rows: int) -> tuple[str, int]:
    n = k = 0
    while n < max_rows:
        k += int(rng.binomial(BATCH, p))
        n += BATCH
        g = GATE.verdict(GateInputs(r, {}, shadow=_evidence(n, k)))
        if g.status != "waiting":
            return g.status, n
    return "waiting", n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for label, p, offline in CASES:
        r = _rollout(offline)
        results = [trial(r, p, rng, 20000) for _ in range(args.trials)]
        halts = sum(1 for s, _ in results if s == "breach")
        share = halts / len(results)
        lo, hi = _wilson(halts, len(results))
        at = sorted(n for _, n in results)
        median = at[len(at) // 2]
        rows.append((label, p, offline, share, lo, hi, median))
    header = (
        "| candidate | true field disagreement | offline | halted [95% CI] "
        "| rows at the verdict (median) | time at 5 req/s, 2 canaries, 25 % |"
    )
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|---|---|---|---|---|---|")
    for label, p, offline, share, lo, hi, median in rows:
        off = "none" if offline is None else f"{offline:.0%}"
        when, secs = f"{median}", f"{median / RATE:.0f} s"
        print(f"| {label} | {p:.0%} | {off} | {share:.2%} [{lo:.2%}, {hi:.2%}] | {when} | {secs} |")


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


if __name__ == "__main__":
    main()
