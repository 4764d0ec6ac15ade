"""Rollout engine decision time for a large fleet (pure ``fleet_server.rollouts.engine.decide``).

Builds N device observations (default 10,000): a canary wave of 10 % already on the new version
with window metrics, the rest the control group on the old one. It times three decisions —
starting the rollout (choosing the canary by stable hash), judging the canary wave (every gate:
safety gates, canary-vs-control reject and fallback rates, drift share, p99 latency from merged
histograms), and growing to the next wave — plus building the observations from telemetry
report payloads with ``rollouts.observation.observe`` (3 reports per device). Median of several
repetitions; prints a table (``--markdown`` for the docs).

    .venv/bin/python bench/bench_rollout.py --devices 10000 --markdown
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.observation import observe
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import Rollout

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    """The telemetry row shape ``observe`` reads."""

    seq: int
    kind: str
    received_at: datetime
    payload: dict[str, Any]


def _metrics(rng: random.Random, reports: int = 4) -> WindowMetrics:
    requests = rng.randint(400, 600)
    buckets = [0] * 12
    for _ in range(requests):
        buckets[min(11, int(rng.expovariate(1.0)))] += 1
    cloud = rng.randint(0, 20)
    return WindowMetrics(
        reports=reports,
        requests=requests,
        rejected=rng.randint(0, 5),
        errors=0,
        device_answers=requests - cloud,
        cloud_answers=cloud,
        drift_windows=8,
        drift_alerts=rng.randint(0, 1),
        max_psi=rng.random() * 0.05,
        latency_buckets=tuple(buckets),
    )


def _fleet(n: int, canary: list[str], rng: random.Random) -> list[DeviceObservation]:
    members = set(canary)
    out = []
    for i in range(n):
        d = f"dev-{i:05d}"
        v = 2 if d in members else 1
        out.append(
            DeviceObservation(
                device_id=d,
                active_version=v,
                assigned_version=v,
                outcome="installed",
                metrics=_metrics(rng),
            )
        )
    return out


def _report(device: str, seq: int, version: int, requests: int, at: datetime) -> Row:
    buckets = [0] * 12
    buckets[1] = requests
    model = {
        "version": version,
        "outcomes": {"ok": requests, "error": 0, "rejected": 0},
        "sources": {"device": requests, "cloud": 0},
        "latency_buckets": buckets,
        "drift": [{"role": "output", "alert": False, "max_psi": 0.01, "rows": 200}],
        "shadow": None,
    }
    payload = {"type": "report", "started_at": 1000.0, "models": {"digits": model}}
    return Row(seq, "report", at, payload)


def _time(fn: Any, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    n = args.devices
    rng = random.Random(0)
    policy = RolloutPolicy(
        canary_fraction=0.1, steps=(0.5, 1.0), dwell_seconds=60, min_devices=3, min_requests=100
    )
    base = Rollout(
        id="ro-bench",
        model="digits",
        from_version=1,
        to_version=2,
        selector=Selector(group="fleet"),
        policy=policy,
        created_at=NOW,
    )
    idle = _fleet(n, [], rng)
    start = decide(base, idle, NOW)
    canary = list(start.assign)
    observations = _fleet(n, canary, rng)
    dwelling = replace(
        start.rollout, members=dict.fromkeys(canary, NOW), wave_started_at=NOW, started_at=NOW
    )
    later = NOW + timedelta(seconds=120)
    judged = decide(dwelling, observations, later)
    t_start = _time(lambda: decide(base, idle, NOW), args.repeat)
    t_judge = _time(lambda: decide(dwelling, observations, later), args.repeat)
    grown = judged.rollout
    t_grow = _time(lambda: decide(grown, observations, later + timedelta(seconds=1)), args.repeat)
    rows = {
        f"dev-{i:05d}": [
            _report(f"dev-{i:05d}", s, 2, 100 * (s + 1), NOW + timedelta(seconds=30 * s))
            for s in range(3)
        ]
        for i in range(n)
    }

    def build() -> None:
        for d, rs in rows.items():
            observe(d, "digits", 2, NOW, None, rs)

    t_obs = _time(build, max(1, args.repeat // 2))
    table = [
        ("start: choose the canary", t_start, f"{len(start.assign)} devices assigned"),
        ("judge the canary wave (every gate)", t_judge, f"state -> {judged.rollout.state}"),
        ("next step after the verdict", t_grow, f"{len(grown.members)} members"),
        ("observations from telemetry (3 reports/device)", t_obs, f"{n} devices"),
    ]
    if args.markdown:
        print(f"Rollout engine, {n:,} devices (median of {args.repeat} runs):\n")
        print("| step | time | per device | result |")
        print("|---|---:|---:|---|")
        for name, t, note in table:
            print(f"| {name} | {t * 1000:.1f} ms | {t / n * 1e6:.2f} us | {note} |")
    else:
        for name, t, note in table:
            print(f"{name:<50} {t * 1000:9.1f} ms  {t / n * 1e6:7.2f} us/device  {note}")


if __name__ == "__main__":
    main()
