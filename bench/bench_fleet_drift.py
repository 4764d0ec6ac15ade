"""Benchmark fleet drift: merge and score tier-A windows of 1,000 devices x 16 features.

Builds a 16-feature baseline (N = 5,000) with the agent's ``build_baseline``, then per device
``--windows`` windows of 1,000 rows (a quarter of the devices shifted by 0.25 sigma on one
feature), serialised as the devices ship them (``TierAView.to_bytes``, base64 in the report).
Measured, on one core, median of ``--repeats``:

- decode: ``TierAView.from_bytes`` of every window (what ``DriftService`` does per window);
- merge: ``FleetAccumulator.add`` of every window into fleet + cohort (+ device) cells;
- score: ``score_fleet`` of the cohort cells (and, with devices, every device's own cell).

Usage:
    .venv/bin/python bench/bench_fleet_drift.py [--devices 1000] [--features 16]
        [--windows 10] [--cohorts 10] [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.drift import TierASketch, TierAView, build_baseline
from fleet_server.drift.cohorts import CohortSpec, DeviceInfo, FleetWindow
from fleet_server.drift.fleet import FleetAccumulator, score_fleet

SEED = 20261201


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--windows", type=int, default=10, help="windows per device")
    ap.add_argument("--cohorts", type=int, default=10, help="device groups")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()

    rng = np.random.default_rng(SEED)
    f = a.features
    base = build_baseline({"x": rng.normal(size=(5000, f))}, {}).view("x")
    devices = {f"dev-{i:05d}": DeviceInfo(f"g{i % a.cohorts}") for i in range(a.devices)}
    blobs: list[tuple[str, bytes]] = []
    shift = np.zeros(f)
    shift[3] = 0.25
    for i, name in enumerate(devices):
        sketch = TierASketch.zero(base.edges)
        for _ in range(a.windows):
            sketch.reset()
            sketch.update(rng.normal(size=(1000, f)) + (shift if i % 4 == 0 else 0.0))
            blobs.append((name, sketch.view().to_bytes()))
    n = len(blobs)
    baselines = {("m", 1, "x", "input"): base}

    t_decode, windows = _timed(
        lambda: [
            FleetWindow(d, "m", 1, "x", "input", 0.0, TierAView.from_bytes(b)) for d, b in blobs
        ],
        a.repeats,
    )
    spec = CohortSpec("group")

    def merge(per_device: bool) -> FleetAccumulator:
        acc = FleetAccumulator(spec, bucket_seconds=3600.0, per_device=per_device)
        for w in windows:
            acc.add(w, devices[w.device_id], base)
        return acc

    rows = []
    for per_device in (False, True):
        t_merge, acc = _timed(lambda pd=per_device: merge(pd), a.repeats)
        cells, device_cells = acc.merged()
        t_score, result = _timed(
            lambda c=cells, d=device_cells: score_fleet(c, baselines, spec=spec, device_cells=d),
            a.repeats,
        )
        total = t_decode + t_merge + t_score
        rows.append((
            "fleet + cohorts + devices" if per_device else "fleet + cohorts",
            len(cells) + len(device_cells), t_decode, t_merge, t_score, total, n / total,
            len(result.drifted_features()), len(result.device_alerts),
        ))  # fmt: skip

    cmd = "python bench/bench_fleet_drift.py " + " ".join(sys.argv[1:])
    head = (
        f"{a.devices:,} devices x {f} features x {a.windows} windows of 1,000 rows = {n:,} "
        f"windows; {a.cohorts} groups; a quarter of the devices shifted 0.25 sigma on feature 3"
    )
    table = [
        "| cells scored | cells | decode | merge | score | total | windows/s "
        "| drifted (feature, bucket) rows | devices alerting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, cells_n, td, tm, ts, tt, rate, dr, da in rows:
        table.append(
            f"| {label} | {cells_n:,} | {td:.3f} s | {tm:.3f} s | {ts:.3f} s | {tt:.3f} s | "
            f"{rate:,.0f} | {dr} | {da:,} |"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    foot = (
        f"median of {a.repeats}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}; `{cmd.strip()}`"
    )
    if a.markdown:
        print(head + "\n\n" + "\n".join(table) + "\n\n" + foot)
    else:
        print(head)
        for r in rows:
            print(r)
        print(foot)


if __name__ == "__main__":
    main()
