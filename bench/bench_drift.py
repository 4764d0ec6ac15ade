"""Benchmark tier-A drift detection: false alarms, detection power and hot-path cost.

Monte Carlo with a fixed seed, through the device's own code (``fit_edges``, ``TierASketch``,
``score``, ``DriftThresholds``, ``judge``, ``DriftMonitor``):

(a) False alarms when nothing drifted, at window sizes n = 200, 1,000, 10,000 and 100,000.
    Every trial draws a fresh baseline of N ~ U[1,000, 5,000] rows and a fresh window from the
    same distribution. Data families: ``gaussian`` (16 N(0, 1) features), ``skewed`` (8
    lognormal + 8 Student-t(5) features) and ``digits`` (the 61 non-constant pixels of
    scikit-learn's digits, resampled with replacement: discrete values, point masses at 0,
    pixels that are non-zero in 1 of 1,797 images). Target: per feature-window false-alarm
    rate <= 1% with ``alpha`` = 1% per feature (``m=1``; PSI OR mean, Bonferroni over the two
    tests). Also shown: the share of windows with any alarm under the default family-wise
    correction (``alpha`` = 1% per window over the tensor's features).
(b) Detection of a 0.25-sigma mean shift of every feature at n = 1,000 (gaussian family,
    default family-wise thresholds). Target: >= 95% of feature-windows.
(c) Hot path: ``TierASketch.update`` per 16-feature row at batch 64 and batch 1, and
    ``DriftMonitor.observe`` (flatten + update + window bookkeeping + the amortised scoring at
    each 1,000-row window close). Median of repeats. Target: update <= 2 us/row at batch 64.

Usage:
    .venv/bin/python bench/bench_drift.py [--markdown] [--json out.json] [--workers 2]
        [--scale 1.0]

``--scale`` multiplies the Monte Carlo trial counts (0.2 for a quick look). Runtime at scale 1
on 2 cores: about 2.5 minutes (Monte Carlo ~140 s, cost ~15 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from edge_agent.drift import (
    DriftMonitor,
    DriftThresholds,
    MonitorPolicy,
    TierASketch,
    build_baseline,
    fit_edges,
    judge,
    score,
)

SEED = 20261122
ALPHA = 0.01
SIZES = (200, 1_000, 10_000, 100_000)
FAMILIES = ("gaussian", "skewed", "digits")
# Windows per (family, n): standard errors of ~0.06 points (n <= 1,000) to ~0.14 points
# (n = 100,000, where the tracker counts 1.6-6 million values per window) inside the budget.
TRIALS = {200: 1_500, 1_000: 1_500, 10_000: 800, 100_000: 250}
DIGITS_TRIALS = {200: 400, 1_000: 400, 10_000: 250, 100_000: 70}  # 61 features per window
SHIFT = 0.25
SHIFT_TRIALS = 300
BASELINE_RANGE = (1_000, 5_000)


def _digits() -> np.ndarray:
    """The digits pixels, less the 3 that are 0 in every image (they can never alarm)."""
    x = np.asarray(load_digits().data, dtype=np.float64)
    return np.ascontiguousarray(x[:, x.max(axis=0) > 0])


def _sampler(family: str, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    if family == "gaussian":
        return lambda k: rng.normal(size=(k, 16))
    if family == "skewed":
        return lambda k: np.concatenate(
            [rng.lognormal(size=(k, 8)), rng.standard_t(5, size=(k, 8))], axis=1
        )
    pool = _digits()
    return lambda k: pool[rng.integers(0, len(pool), size=k)]


def _view(edges: Any, x: np.ndarray) -> Any:
    tracker = TierASketch.zero(edges)
    for start in range(0, x.shape[0], 20_000):  # bounded temporaries at n = 100,000
        tracker.update(x[start : start + 20_000])
    return tracker.view()


@dataclass
class Tally:
    """Counts from a batch of Monte Carlo windows, under both alpha conventions."""

    feature_windows: int = 0  # judged (feature, window) pairs
    alarms: int = 0  # drifted features, alpha 1% per feature (m = 1)
    alarms_psi: int = 0
    alarms_mean: int = 0
    alarms_fw: int = 0  # drifted features, alpha 1% family-wise over the window's features
    alarms_fw_psi: int = 0
    alarms_fw_mean: int = 0
    windows: int = 0
    windows_alarmed_fw: int = 0  # windows with any drifted feature, family-wise

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def run_trials(task: tuple[str, int, float, int, int]) -> Tally:
    """``trials`` windows of ``family`` at size ``n``, every feature shifted by ``shift``."""
    family, n, shift, trials, seed = task
    rng = np.random.default_rng(seed)
    draw = _sampler(family, rng)
    out = Tally()
    for _ in range(trials):
        big_n = int(rng.integers(BASELINE_RANGE[0], BASELINE_RANGE[1] + 1))
        base_x = draw(big_n)
        edges = fit_edges(base_x, 10)
        s = score(_view(edges, draw(n) + shift), _view(edges, base_x))
        per_feature = judge(s, DriftThresholds.for_scores(s, ALPHA, m=1))
        family_wise = judge(s, DriftThresholds.for_scores(s, ALPHA))
        out.feature_windows += int(per_feature.judged.sum())
        out.alarms += int(per_feature.drifted.sum())
        out.alarms_psi += int(per_feature.by_test["psi"].sum())
        out.alarms_mean += int(per_feature.by_test["mean"].sum())
        out.alarms_fw += int(family_wise.drifted.sum())
        out.alarms_fw_psi += int(family_wise.by_test["psi"].sum())
        out.alarms_fw_mean += int(family_wise.by_test["mean"].sum())
        out.windows += 1
        out.windows_alarmed_fw += int(family_wise.alert)
    return out


def monte_carlo(scale: float, workers: int) -> dict[tuple[str, int, float], Tally]:
    jobs: list[tuple[str, int, float, int, int]] = []
    keys = [(f, n, 0.0) for f in FAMILIES for n in SIZES] + [("gaussian", 1_000, SHIFT)]
    seeds = np.random.SeedSequence(SEED).spawn(len(keys))
    for (family, n, shift), seq in zip(keys, seeds, strict=True):
        trials = SHIFT_TRIALS if shift else (DIGITS_TRIALS if family == "digits" else TRIALS)[n]
        trials = max(1, round(trials * scale))
        # Split into chunks so both workers stay busy; each chunk has its own child seed.
        chunks = max(1, min(8, trials // 10))
        for i, child in enumerate(seq.spawn(chunks)):
            count = trials // chunks + (1 if i < trials % chunks else 0)
            jobs.append((family, n, shift, count, int(child.generate_state(1)[0])))
    totals = {k: Tally() for k in keys}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for job, tally in zip(jobs, pool.map(run_trials, jobs), strict=True):
            totals[(job[0], job[1], job[2])].add(tally)
    return totals


def _median_us_per_row(fn: Callable[[], None], rows: int, calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / (calls * rows) * 1e6)
    return float(np.median(samples))


def hot_path() -> dict[str, float]:
    rng = np.random.default_rng(SEED)
    base_x = rng.normal(size=(5_000, 16)).astype(np.float32)
    baseline = build_baseline({"x": base_x}, {}, n_bins=10)
    edges = baseline.view("x").edges
    out: dict[str, float] = {}
    for batch in (64, 1):
        pool = [rng.normal(size=(batch, 16)) for _ in range(256)]
        it = iter(range(1 << 62))
        tracker = TierASketch.zero(edges)
        calls = 2_000

        def update(
            tracker: TierASketch = tracker, pool: list[np.ndarray] = pool, it: Any = it
        ) -> None:
            tracker.update(pool[next(it) & 255])

        out[f"update_b{batch}"] = _median_us_per_row(update, batch, calls, 15)
        monitor = DriftMonitor(baseline, MonitorPolicy(max_values=1_000, max_seconds=60.0))
        raw = [p.astype(np.float32) for p in pool]

        def observe(
            monitor: DriftMonitor = monitor, raw: list[np.ndarray] = raw, it: Any = it
        ) -> None:
            k = next(it)
            monitor.observe("x", raw[k & 255], k * 1e-4)

        out[f"observe_b{batch}"] = _median_us_per_row(observe, batch, calls, 15)
    for f in (16, 64, 256):
        x = rng.normal(size=(5_000, f))
        e = fit_edges(x)
        base_view, window = _view(e, x), _view(e, rng.normal(size=(1_000, f)))

        def close(window: Any = window, base_view: Any = base_view) -> None:
            s = score(window, base_view)
            judge(s, DriftThresholds.for_scores(s))

        out[f"close_f{f}"] = _median_us_per_row(close, 1, 20, 7) / 1e3  # ms per window
    return out


def _rate(k: int, n: int) -> str:
    return f"{100 * k / n:.2f}%" if n else "-"


def _with_ci(k: int, n: int, z: float = 1.96) -> str:
    """``k / n`` as a percentage with its 95% Wilson score interval."""
    if n == 0:
        return "-"
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * p:.2f}% [{100 * max(centre - half, 0):.2f}, {100 * (centre + half):.2f}]"


def _table(header: tuple[str, ...], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [list(header), *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [list(header), *body])


def render(mc: dict[tuple[str, int, float], Tally], hp: dict[str, float], markdown: bool) -> str:
    fa_head = (
        "family", "n", "feature-windows", "false alarms per feature-window (alpha 1%/feature)",
        "by PSI", "by mean", "windows", "windows with any alarm (alpha 1%/window, m = f)",
        "target <= 1%",
    )  # fmt: skip
    fa = []
    for family in FAMILIES:
        for n in SIZES:
            t = mc[(family, n, 0.0)]
            fw = t.feature_windows
            fa.append([
                family, f"{n:,}", f"{fw:,}", _with_ci(t.alarms, fw), _rate(t.alarms_psi, fw),
                _rate(t.alarms_mean, fw), f"{t.windows:,}",
                _with_ci(t.windows_alarmed_fw, t.windows),
                "pass" if t.alarms <= 0.01 * fw else "FAIL",
            ])  # fmt: skip
    d = mc[("gaussian", 1_000, SHIFT)]
    fw = d.feature_windows
    det_head = (
        "shift", "n", "feature-windows", "detected (alpha 1% family-wise, m = 16)", "by PSI",
        "by mean", "detected (alpha 1%/feature)", "target >= 95%",
    )  # fmt: skip
    det = [[
        f"{SHIFT} sigma", "1,000", f"{fw:,}", _rate(d.alarms_fw, fw), _rate(d.alarms_fw_psi, fw),
        _rate(d.alarms_fw_mean, fw), _rate(d.alarms, fw),
        "pass" if d.alarms_fw >= 0.95 * fw else "FAIL",
    ]]  # fmt: skip
    ok64 = "pass" if hp["update_b64"] <= 2.0 else "FAIL"
    observe = "DriftMonitor.observe, 16 features (window close amortised)"
    cost = [
        ["TierASketch.update, 16 features", "64", f"{hp['update_b64']:.2f} us/row",
         f"<= 2: {ok64}"],
        ["TierASketch.update, 16 features", "1", f"{hp['update_b1']:.2f} us/row", "-"],
        [observe, "64", f"{hp['observe_b64']:.2f} us/row", "-"],
        [observe, "1", f"{hp['observe_b1']:.2f} us/row", "-"],
    ]  # fmt: skip
    for f in (16, 64, 256):
        cost.append([f"window close: score + thresholds + judge, {f} features", "-",
                     f"{hp[f'close_f{f}']:.2f} ms/window", "-"])  # fmt: skip
    return "\n".join([
        "(a) False alarms, nothing drifted (fresh baseline N ~ U[1,000, 5,000] per window;"
        " [95% CI])",
        "",
        _table(fa_head, fa, markdown),
        "",
        "(b) Detection of a mean shift of every feature (gaussian, N ~ U[1,000, 5,000])",
        "",
        _table(det_head, det, markdown),
        "",
        "(c) Cost (median of 15 repeats; one core)",
        "",
        _table(("operation", "batch", "cost", "target"), cost, markdown),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply trial counts")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    mc = monte_carlo(args.scale, args.workers)
    t_mc = time.perf_counter() - t0
    hp = hot_path()
    print(render(mc, hp, args.markdown))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(
        f"\nseed {SEED}, scale {args.scale}, {args.workers} workers; Monte Carlo {t_mc:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s; Python {platform.python_version()}, numpy "
        f"{np.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the end"
    )
    if args.json:
        raw = {f"{k[0]}/{k[1]}/{k[2]}": vars(v) for k, v in mc.items()}
        args.json.write_text(json.dumps({"monte_carlo": raw, "hot_path": hp}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
