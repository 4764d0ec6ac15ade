"""The ``ground_truth`` gate on simulated fleets: false halts of good candidates, and how fast
it stops bad ones, as a function of how many answers the applications label.

A Monte Carlo of whole rollouts through the pure engine (``fleet_server.rollouts.engine.decide``)
with the default ``RolloutPolicy`` and only the ``ground_truth`` gate registered, on a fake
clock (30 s report intervals). Every device answers 1 request/s (``--rate``); a share of its
answers is labelled later by its application (``--labelled``: 10 % by default), each right with
the device's own accuracy (a Beta around the version's accuracy, strength 200: devices see
different inputs). A good candidate has the live version's accuracy (99 %); bad ones are
``--drops`` points worse (the issue's confidently wrong candidate is 10 points worse). A
member's window starts when it joins the new version, the control group's when the rollout
starts (as the runner observes them).

Prints a markdown table: per candidate, rollouts run, the share halted (false halts for the good
one) with a 95 % Wilson interval, the share halted at the canary wave, and the median fake time
from the rollout's start to the halt.

    .venv/bin/python bench/bench_ground_truth.py                 # the table in docs/rollouts.md
    .venv/bin/python bench/bench_ground_truth.py --rollouts 100  # quick look
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import numpy as np

from edge_agent.quality.confusion import Confusion, wilson_interval
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.gates.ground_truth import GATE
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import Rollout

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = 30.0


class Fleet:
    """Per device: version, labelled answers (right, total) since its window started."""

    def __init__(self, rng: np.random.Generator, n: int, live: float, candidate: float) -> None:
        self.rng = rng
        self.ids = [f"d{i:04d}" for i in range(n)]
        self.version = dict.fromkeys(self.ids, 1)
        self.right = dict.fromkeys(self.ids, 0)
        self.total = dict.fromkeys(self.ids, 0)
        strength = 200.0
        self.acc = {
            1: {d: rng.beta(live * strength, (1 - live) * strength) for d in self.ids},
            2: {d: rng.beta(candidate * strength, (1 - candidate) * strength) for d in self.ids},
        }

    def assign(self, devices: tuple[str, ...]) -> None:
        for d in devices:
            self.version[d] = 2
            self.right[d] = self.total[d] = 0  # its window starts on the new version

    def advance(self, labels_per_interval: float) -> None:
        for d in self.ids:
            n = int(self.rng.poisson(labels_per_interval))
            self.total[d] += n
            self.right[d] += int(self.rng.binomial(n, self.acc[self.version[d]][d]))

    def observations(self) -> list[DeviceObservation]:
        out = []
        for d in self.ids:
            v, n, k = self.version[d], self.total[d], self.right[d]
            # Two classes are enough: the gate reads the diagonal.
            confusion = Confusion(((k, n - k), (0, 0))) if n else None
            metrics = WindowMetrics(reports=1, requests=n, confusion=confusion)
            out.append(DeviceObservation(d, v, v, "installed", metrics=metrics))
        return out


def one_rollout(
    rng: np.random.Generator, n: int, live: float, candidate: float, labels: float
) -> tuple[bool, int, float]:
    """(halted, wave, fake seconds to the end)."""
    fleet = Fleet(rng, n, live, candidate)
    r = Rollout("ro", "m", 1, 2, Selector(group="g"), RolloutPolicy(), created_at=T0)
    t = 0.0
    for _ in range(100_000):
        d = decide(r, fleet.observations(), T0 + timedelta(seconds=t), gates=(GATE,))
        r = d.rollout
        if d.assign:
            fleet.assign(d.assign)
        if not r.active or r.state == "paused":
            return r.state != "completed", r.wave, t
        t += INTERVAL
        fleet.advance(labels)
    raise RuntimeError("rollout did not finish")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rollouts", type=int, default=400, help="rollouts per candidate")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate", type=float, default=1.0, help="requests/s per device")
    p.add_argument("--labelled", type=float, default=0.1, help="share of answers labelled")
    p.add_argument("--accuracy", type=float, default=0.99, help="the live version's accuracy")
    p.add_argument("--drops", default="0,2,5,10", help="candidates: points below live")
    p.add_argument("--seed", type=int, default=12)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    labels = a.rate * a.labelled * INTERVAL
    print(
        f"{a.devices} devices, {a.rate:g} req/s each, {a.labelled:.1%} labelled "
        f"({labels:g} labels per device per 30 s), live accuracy {a.accuracy:.1%}, default policy"
    )
    print()
    print("| candidate | rollouts | halted (95 % CI) | at the canary wave | median time to halt |")
    print("|---|---|---|---|---|")
    for drop in (float(x) for x in a.drops.split(",")):
        runs = [
            one_rollout(rng, a.devices, a.accuracy, a.accuracy - drop / 100, labels)
            for _ in range(a.rollouts)
        ]
        halted = [x for x in runs if x[0]]
        lo, hi = wilson_interval(len(halted), len(runs))
        canary = sum(1 for x in halted if x[1] == 0)
        median = f"{np.median([x[2] for x in halted]):.0f} s" if halted else "-"
        name = "good (same accuracy)" if drop == 0 else f"{drop:g} points worse"
        print(
            f"| {name} | {len(runs)} | {len(halted) / len(runs):.1%} [{lo:.1%}, {hi:.1%}] "
            f"| {canary / max(1, len(halted)):.0%} of halts | {median} |"
        )


if __name__ == "__main__":
    main()
