"""Benchmark ``TierASketch.update`` against the plain single-path algorithm, in CPU time.

The plain algorithm (``PlainSketch`` below: every batch, one row or many, goes through the
tiled comparison in steps of about 2**15 tiled threshold values (46 rows at 64 features),
the uint8 reduce and a whole-table ``bincount``; moments under an
``errstate`` block with an ``isfinite`` check) is what ``update`` ran before the one-row path.
Both run in the same process, alternating round by round (order swapped each round), on the
same finite float64 batches (``flatten_features`` output) at 64 features and 10 bins, the
input tensor of the digits model; 10 features is its output tensor. Printed: median CPU
microseconds per call (``time.process_time`` over many calls per round) and the per-round
plain/current ratio, median and min-max. ``tests/property/test_property_tier_a.py`` checks the
two give bit-identical results. Last, the share of ``update`` in ``DriftMonitor.observe`` on
the pipeline's 256-row blocks.

Usage:
    .venv/bin/python bench/bench_sketch.py [--rounds 7] [--calls 4000] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from edge_agent.drift import (
    DriftMonitor,
    FeatureEdges,
    MonitorPolicy,
    TierASketch,
    build_baseline,
    fit_edges,
)
from edge_agent.errors import DriftError

# (features, batch rows); the agent's pipeline sketches in 256-row blocks (serving.pipeline.BLOCK)
CASES = ((64, 1), (64, 8), (64, 64), (64, 256), (10, 1), (10, 64), (10, 256))
N_BINS = 10


class PlainSketch(TierASketch):
    """``TierASketch`` with the plain single-path ``update`` (the reference for the ratio)."""

    __slots__ = ()

    def __init__(self, edges: FeatureEdges) -> None:
        super().__init__(edges)
        # The plain algorithm's step: about 2**15 tiled threshold values, at most 128 rows.
        k, f = edges.n_bins + 1, edges.n_features
        self._chunk = min(128, max(1, (1 << 15) // (k * f)))
        self._tiled = np.ascontiguousarray(
            np.broadcast_to(edges.thresholds.T[:, None, :], (k, self._chunk, f))
        )

    def update(self, batch2d: npt.ArrayLike) -> None:
        x = np.asarray(batch2d)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DriftError(f"expected a batch of shape (n, {self.n_features}), got {x.shape}")
        if x.dtype.kind not in "biuf":
            raise DriftError(f"drift needs real numeric values, got dtype {x.dtype}")
        if x.shape[0] == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if x.dtype != np.float64:
                x = x.astype(np.float64)
            total = x.sum(axis=0)
            all_finite = bool(np.isfinite(total).all())
            for start in range(0, x.shape[0], self._chunk):
                self._bin(x[start : start + self._chunk], all_finite)
            if all_finite:
                self._count += x.shape[0]
                self._sum += total
                self._sumsq += np.einsum("ij,ij->j", x, x)
            else:
                finite = np.isfinite(x)
                xf = np.where(finite, x, 0.0)
                self._count += finite.sum(axis=0)
                self._sum += xf.sum(axis=0)
                self._sumsq += np.einsum("ij,ij->j", xf, xf)


def _cpu_us_per_call(fn: Callable[[], None], calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def measure(f: int, rows: int, rounds: int, calls: int) -> dict[str, object]:
    """Median CPU us per call of both implementations and the per-round ratios."""
    rng = np.random.default_rng(20261208 + f)
    edges = fit_edges(rng.normal(size=(2000, f)), n_bins=N_BINS)
    batches = [rng.normal(size=(rows, f)) * 1.1 + 0.1 for _ in range(16)]
    plain, current = PlainSketch.zero(edges), TierASketch.zero(edges)
    per_call = max(100, calls // max(1, rows // 8))
    times: dict[str, list[float]] = {"plain": [], "current": []}
    ratios = []

    def run(sketch: TierASketch) -> Callable[[], None]:
        it = iter(())

        def call() -> None:
            nonlocal it
            b = next(it, None)
            if b is None:
                it = iter(batches)
                b = next(it)
            sketch.update(b)

        return call

    fns = {"plain": run(plain), "current": run(current)}
    for fn in fns.values():
        _cpu_us_per_call(fn, per_call // 4)  # warm up
    for r in range(rounds):
        order = ("plain", "current") if r % 2 == 0 else ("current", "plain")
        got = {name: _cpu_us_per_call(fns[name], per_call) for name in order}
        for name, us in got.items():
            times[name].append(us)
        ratios.append(got["plain"] / got["current"])
    if plain.view() != current.view():
        raise SystemExit("plain and current sketches disagree")
    return {
        "features": f,
        "rows": rows,
        "plain_us": statistics.median(times["plain"]),
        "current_us": statistics.median(times["current"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "calls": per_call,
    }


def monitor_share(rounds: int, blocks: int = 400) -> dict[str, float]:
    """CPU us per row of ``DriftMonitor.observe`` on 256-row blocks of a 64-input, 10-output
    model (default policy: 1,000-row windows), and of ``TierASketch.update`` alone on the same
    float64 blocks; the rest is flattening and the amortised window close. Medians of rounds."""
    rng = np.random.default_rng(20261208)
    shapes = {"input": 64, "probabilities": 10}
    base = {n: rng.normal(size=(3000, f)).astype(np.float32) for n, f in shapes.items()}
    baseline = build_baseline(base, {}, n_bins=N_BINS)
    pool = [
        {n: rng.normal(size=(256, f)).astype(np.float32) for n, f in shapes.items()}
        for _ in range(16)
    ]
    flat = [{n: b.astype(np.float64) for n, b in p.items()} for p in pool]
    observe, update = [], []
    for _ in range(rounds):
        monitor = DriftMonitor(baseline, MonitorPolicy())
        t0 = time.process_time()
        for i in range(blocks):
            for name, block in pool[i & 15].items():
                monitor.observe(name, block, i * 1e-3)
        observe.append((time.process_time() - t0) / (blocks * 256) * 1e6)
        trackers = {n: TierASketch.zero(baseline.view(n).edges) for n in shapes}
        t0 = time.process_time()
        for i in range(blocks):
            for name, block in flat[i & 15].items():
                trackers[name].update(block)
        update.append((time.process_time() - t0) / (blocks * 256) * 1e6)
    return {"observe": statistics.median(observe), "update": statistics.median(update)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=4000, help="calls per round at batch <= 8")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    results = [measure(f, rows, args.rounds, args.calls) for f, rows in CASES]
    share = monitor_share(args.rounds)
    load_after = os.getloadavg()
    if args.markdown:
        print("| features | batch | plain, us/call | current, us/call | current, us/row |", end="")
        print(" plain/current [min-max] |")
        print("|---|---|---|---|---|---|")
    for r in results:
        per_row = float(r["current_us"]) / int(r["rows"])  # type: ignore[arg-type]
        if args.markdown:
            print(
                f"| {r['features']} | {r['rows']} | {r['plain_us']:.2f} | {r['current_us']:.2f} "
                f"| {per_row:.3f} | {r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] |"
            )
        else:
            print(
                f"f={r['features']:>3} batch={r['rows']:>3}: plain {r['plain_us']:8.2f} us/call, "
                f"current {r['current_us']:8.2f} us/call ({per_row:.3f} us/row), "
                f"plain/current {r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
            )
    print()
    print(
        f"DriftMonitor.observe, 256-row blocks of 64 + 10 features, 1,000-row windows: "
        f"{share['observe']:.2f} us/row; TierASketch.update alone on the same blocks: "
        f"{share['update']:.2f} us/row ({100 * share['update'] / share['observe']:.0f}%); "
        f"the rest is flattening and the amortised window close"
    )
    print()
    print(
        f"CPU time (time.process_time), median of {args.rounds} alternating rounds; "
        f"n_bins {N_BINS}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
