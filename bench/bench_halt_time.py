"""Time from a rollout's start to the halt decision for a confidently wrong candidate, per layer.

The candidates are the real example models (``model_builder.examples``): the digits MLP
retrained with 90 % of its 3s labelled 8 (``digits_mislabelled_mlp``) and with 90 % of its 9s
labelled 4 (``digits_nines_as_fours_mlp``): about 9 points less accurate than the live
``digits_mlp``, confidence no lower, same inputs. Their behaviour in the simulated fleets is
measured, not assumed: how often each answers ``u`` where the live model answers ``t``, and
both models' accuracies, on the held-out digits split.

Per layer, with the default ``RolloutPolicy`` (dwell 300 s, shadow dwell 120 s, canary 10 %):

* **offline comparison** (at ``rollouts create``, nothing shipped): the comparison and verdict
  (``edge_agent.quality.compare`` with the policy's offline limits) on the held-out split, and
  its wall time here (the whole check with bundle verification and model loading is
  ``bench/bench_offline_compare.py``: tens of ms);
* **shadow disagreement**: the shadow phase on the canaries (``decide`` given ``ShadowInputs``):
  each canary replays ``shadow_fraction`` of its answers on the candidate; the compared rows and
  their flips are drawn from the device's class mix and the measured flip matrix;
* **output distribution**: no shadow phase (older agents, or ``--no-shadow``): the canary serves,
  and the gates judge its answers against the control group and its own before-switch windows
  (``bench_false_halts.Fleet``: heterogeneous devices, class mixes, Poisson traffic, every gate);
* **ground truth**: only the ``ground_truth`` gate, with a share of the answers labelled by the
  applications (``bench_ground_truth.Fleet``: each device's accuracy a Beta around its version's).

Every layer runs the pure engine (``fleet_server.rollouts.engine.decide``) on a fake clock with
30 s report intervals at ``--rate`` requests/s per device (5 by default, one row each). The time
is fake seconds from the rollout's start to the decision that halts it (pause, the default
``on_breach``), the median and maximum over ``--rollouts`` rollouts; "canary" is the share of
halts taken while only the canary wave had the candidate.

    .venv/bin/python bench/bench_halt_time.py                  # the table in docs/rollouts.md
    .venv/bin/python bench/bench_halt_time.py --rollouts 5 --fleets 100   # quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_false_halts as fh
import bench_ground_truth as gt
from edge_agent.quality.compare import compare_models, judge
from edge_agent.quality.confusion import Confusion
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.offline import offline_limits
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.shadow_evidence import ShadowEvidence, ShadowInputs
from fleet_server.rollouts.state import Rollout

CLASSES = 10


@dataclass(frozen=True)
class Candidate:
    """A bad candidate as measured on the held-out split against the live model."""

    name: str
    flips: np.ndarray  # flips[t, u]: P(candidate answers u | live answers t)
    live_accuracy: float
    accuracy: float
    offline_refused: bool
    offline_reason: str
    offline_ms: float


def measure_candidates() -> list[Candidate]:
    """Train the live model and both wrong ones; their flip matrices and the offline verdict."""
    from model_builder import examples

    live = examples.digits_mlp()
    y = live.y_eval
    a = live.reference_eval_proba.argmax(axis=1)
    out = []
    makers: list[tuple[str, Callable[[], examples.ExampleModel]]] = [
        ("3s trained as 8s", examples.digits_mislabelled_mlp),
        ("9s trained as 4s", examples.digits_nines_as_fours_mlp),
    ]
    for name, make in makers:
        b = make().reference_eval_proba.argmax(axis=1)
        counts = np.zeros((CLASSES, CLASSES))
        np.add.at(counts, (a, b), 1)
        flips = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        t0 = time.perf_counter()
        verdict = judge(compare_models(y, a, b, CLASSES), offline_limits(RolloutPolicy()))
        ms = (time.perf_counter() - t0) * 1000
        out.append(
            Candidate(
                name,
                flips,
                float(np.mean(a == y)),
                float(np.mean(b == y)),
                verdict.regressed,
                verdict.reasons[0] if verdict.reasons else "",
                ms,
            )
        )
    return out


def shadow_rollout(
    rng: np.random.Generator, n: int, rates: fh.Rates, lat: list[np.ndarray], flips: np.ndarray
) -> tuple[str, tuple[str, ...], float, int]:
    """A rollout with the shadow phase: (final state, breached gates, fake seconds, wave)."""
    policy = RolloutPolicy()
    fraction = policy.shadow_fraction or 0.0
    fleet = fh.Fleet(rng, n, rates, lat)
    fleet.answers = flips
    r = Rollout("ro", "digits", 1, 2, Selector(group="g"), policy, created_at=fh.T0)
    seen: dict[str, np.ndarray] = {}  # per shadowed canary: live class x shadow class
    t = 0.0
    for _ in range(10_000):
        evidence = {}
        for dev, m in seen.items():
            total = int(m.sum())
            agree = int(np.trace(m))
            counts = tuple(tuple(int(c) for c in row) for row in m)
            evidence[dev] = ShadowEvidence(total, agree, Confusion(counts), 1 if total else 0, 1)
        inputs = ShadowInputs(frozenset(fleet.ids), True, evidence)
        d = decide(r, fleet.observations(), fh.T0 + timedelta(seconds=t), shadow=inputs)
        r = d.rollout
        for dev in d.shadow:
            seen[dev] = np.zeros((CLASSES, CLASSES), dtype=np.int64)
        if d.assign:
            fleet.assign(d.assign, t)
        if not r.active:
            bad = tuple(g.name for g in r.gates if g.status == "breach")
            return r.state, bad, t, r.wave
        t += fh.INTERVAL
        fleet.advance(t)
        if r.phase == "shadow":
            for dev, m in seen.items():
                i = fleet.index[dev]
                rows = int(rng.binomial(rng.poisson(fleet.rate[i] * fh.INTERVAL), fraction))
                p = (fleet.mix[i][:, None] * flips).ravel()
                seen[dev] = m + rng.multinomial(rows, p / p.sum()).reshape(CLASSES, CLASSES)
    raise RuntimeError("rollout did not finish")


Run = tuple[bool, int, float, tuple[str, ...]]  # halted, wave, fake seconds, breached gates


def _summary(runs: list[Run]) -> tuple[str, str, str, str, str]:
    """(halted, at the canary, median time, max time, gates that halted) of ``runs``."""
    halted = [r for r in runs if r[0]]
    if not halted:
        return f"0/{len(runs)}", "-", "-", "-", "-"
    secs = [r[2] for r in halted]
    canary = sum(1 for r in halted if r[1] <= 0)  # the shadow phase (-1) or the canary wave
    gates = Counter(g for r in halted for g in r[3])
    return (
        f"{len(halted)}/{len(runs)}",
        f"{canary}/{len(halted)}",
        f"{np.median(secs):.0f} s",
        f"{max(secs):.0f} s",
        ", ".join(f"{g} {k}" for g, k in gates.most_common()),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rollouts", type=int, default=20, help="rollouts per row")
    p.add_argument("--fleets", default="100,1000", help="fleet sizes")
    p.add_argument("--rate", type=float, default=5.0, help="requests/s per device")
    p.add_argument("--labelled", default="0.01,0.1", help="shares of answers labelled")
    p.add_argument("--seed", type=int, default=12)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    started = time.perf_counter()
    candidates = measure_candidates()
    rates = fh.Rates(rate=a.rate)
    # Latency is not what these candidates change: the same synthetic distribution on both sides.
    lat = [rng.lognormal(np.log(0.4), 0.3, 20_000)]
    print(
        f"Default policy, {a.rate:g} requests/s per device, 30 s reports, {a.rollouts} rollouts "
        "per row; fake time from the rollout's start to the halt (pause).\n"
    )
    for c in candidates:
        print(
            f"- {c.name}: accuracy {c.accuracy:.1%} vs live {c.live_accuracy:.1%}; offline "
            f"{'refused' if c.offline_refused else 'passed'} ({c.offline_ms:.1f} ms): "
            f"{c.offline_reason}"
        )
    print()
    print(
        "| layer | candidate | fleet | halted | no wider than the canary | median time to halt "
        "| max time | halted by |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in candidates:
        said = "refused" if c.offline_refused else "passed"
        cells = ["offline comparison (eval set registered)", c.name, "any", said, "nothing sent"]
        cells += ["0 s (at create)", "0 s", "offline_regression" if c.offline_refused else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)
    for n in (int(x) for x in a.fleets.split(",")):
        for c in candidates:
            layers: list[tuple[str, Callable[[], Run]]] = [
                (
                    "shadow disagreement (no eval set)",
                    lambda c=c, n=n: _ran(shadow_rollout(rng, n, rates, lat, c.flips)),
                ),
                (
                    "output distribution (no shadow phase)",
                    lambda c=c, n=n: _ran(
                        fh.one_rollout(rng, n, RolloutPolicy(), rates, lat, answers=c.flips)
                    ),
                ),
            ]
            for share in (float(x) for x in a.labelled.split(",")):
                labels = a.rate * share * gt.INTERVAL
                layers.append(
                    (
                        f"ground truth only, {share:.0%} labelled",
                        lambda c=c, n=n, labels=labels: _gt(
                            gt.one_rollout(rng, n, c.live_accuracy, c.accuracy, labels)
                        ),
                    )
                )
            for layer, run in layers:
                t0 = time.perf_counter()
                cells = [layer, c.name, str(n), *_summary([run() for _ in range(a.rollouts)])]
                print("| " + " | ".join(cells) + " |", flush=True)
                print(
                    f"{n}/{c.name}/{layer}: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr
                )
    print(f"\n{time.perf_counter() - started:.0f} s wall", file=sys.stderr)


def _ran(result: tuple[str, tuple[str, ...], float, int]) -> Run:
    state, bad, secs, wave = result
    return state != "completed", wave, secs, bad


def _gt(result: tuple[bool, int, float]) -> Run:
    halted, wave, secs = result
    return halted, wave, secs, ("ground_truth",) if halted else ()


if __name__ == "__main__":
    main()
