"""The drift p-values: one scalar ``chi2_sf`` / ``norm_sf`` call per feature (as ``judge`` did)
against ``chi2_sf_array`` / ``norm_two_sided_array`` (as it does now), in process CPU time.

Two shapes: one window of ``--features`` features (a device's ``judge``) and a fleet report's
stack of ``--cells`` windows of that many features (``judge_stack``). Statistics are drawn
under no drift (chi-square with ``--dof`` d.o.f., standard normal z). Rounds alternate the two
forms; it prints the median CPU time per call of each and their ratio.

    .venv/bin/python bench/bench_drift_tails.py [--features 64] [--cells 1011] [--dof 7]
        [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.drift.distributions import (
    chi2_sf,
    chi2_sf_array,
    norm_sf,
    norm_two_sided_array,
)


def _cpu(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--cells", type=int, default=1011)
    ap.add_argument("--dof", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average: {Path('/proc/loadavg').read_text().split()[0]}")
    print("| shape | p-values | scalar loop | arrays | scalar / arrays |")
    print("|---|---|---:|---:|---:|")
    for label, n, calls in (("one window", a.features, 200), ("stack", a.features * a.cells, 1)):
        x = rng.chisquare(a.dof, n)
        dof = np.full(n, a.dof)
        z = rng.normal(size=n)

        def scalar_chi2(x: Any = x, dof: Any = dof) -> Any:
            return [chi2_sf(v, d) for v, d in zip(x.tolist(), dof.tolist(), strict=True)]

        def scalar_norm(z: Any = z) -> Any:
            return [2.0 * norm_sf(abs(v)) for v in z.tolist()]

        pairs = (
            ("chi-square", scalar_chi2, lambda x=x, dof=dof: chi2_sf_array(x, dof)),
            ("normal", scalar_norm, lambda z=z: norm_two_sided_array(z)),
        )
        for name, slow, fast in pairs:
            s_t, f_t = [], []
            for _ in range(a.rounds):
                s_t.append(_cpu(slow, calls))
                f_t.append(_cpu(fast, calls))
            s, f = statistics.median(s_t), statistics.median(f_t)
            ratio = s / f if f > 0 else math.inf
            print(f"| {label} ({n:,} values) | {name} | {s * 1e3:.3f} ms | {f * 1e3:.3f} ms | "
                  f"{ratio:.1f} |")  # fmt: skip
    print(f"load average: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
