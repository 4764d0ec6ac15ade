"""The per-model hot path: sketch buffering, budget sampling, tier-B KLL, OOD test."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np

from bundles import DigitsBundles
from edge_agent.bundle import read_bundle
from edge_agent.config import DriftConfig, ModelPolicy
from edge_agent.drift import build_baseline
from edge_agent.runtime.loader import load_runtime
from edge_agent.serving.pipeline import BLOCK, ModelPipeline


def _pipeline(
    bundles: DigitsBundles, drift: DriftConfig, kll: bool = False, clock: object = None
) -> ModelPipeline:
    loaded = read_bundle(
        bundles.path(1),
        bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    manifest = loaded.manifest
    if kll:
        x = bundles.x_eval[:300]
        probs = np.full((300, 10), 0.1)
        manifest = dataclasses.replace(
            manifest, baseline=build_baseline({"input": x}, {"probabilities": probs}, kll_k=64)
        )
    runtime = load_runtime(loaded.artifact, "onnx")
    kwargs = {"clock": clock} if clock is not None else {}
    return ModelPipeline(manifest, runtime, ModelPolicy(), drift, **kwargs)  # type: ignore[arg-type]


def test_rows_are_sketched_in_blocks(digits_bundles: DigitsBundles) -> None:
    p = _pipeline(digits_bundles, DriftConfig(window_values=BLOCK))
    for i in range(BLOCK - 1):
        p.run({"input": digits_bundles.x_eval[i % 400 : i % 400 + 1]})
    assert p.monitor.snapshot()["input"].open_rows == 0  # still buffered
    p.run({"input": digits_bundles.x_eval[:1]})
    windows = p.collect_windows()
    assert [w.tensor for w in windows] == ["input", "probabilities"]
    assert windows[0].rows == BLOCK


def test_sketching_budget_samples_instead_of_slowing_down(digits_bundles: DigitsBundles) -> None:
    now = [0.0]
    p = _pipeline(
        digits_bundles,
        DriftConfig(window_values=10_000, max_rows_per_second=512),
        clock=lambda: now[0],
    )
    batch = digits_bundles.x_eval[:64]
    for _ in range(40):  # 2,560 rows per tensor within the same instant
        p.run({"input": batch})
    sketched = p.monitor.snapshot()["input"].open_rows
    assert sketched == 256  # one budget (512 rows) covers one input and one output block
    assert p.sketch_sampled_out == 2 * 40 * 64 - 2 * sketched - 2 * 0
    now[0] += 10.0  # the budget refills with time
    for _ in range(4):
        p.run({"input": batch})
    assert p.monitor.snapshot()["input"].open_rows == 512


def test_tier_b_kll_quantiles_follow_live_traffic(digits_bundles: DigitsBundles) -> None:
    p = _pipeline(digits_bundles, DriftConfig(kll=True), kll=True)
    assert set(p.kll) == {"input", "probabilities"}
    for start in range(0, 384, 64):
        p.run({"input": digits_bundles.x_eval[start : start + 64]})
    summary = p.kll_summary((0.5,))
    assert summary["input"]["rows"] == 256
    live = np.asarray(summary["input"]["live"])[:, 0]
    base = np.asarray(summary["input"]["baseline"])[:, 0]
    assert np.abs(live - base).max() <= 4.0  # same distribution: medians within a few levels


def test_out_of_distribution_uses_the_baseline_range(digits_bundles: DigitsBundles) -> None:
    p = _pipeline(digits_bundles, DriftConfig())
    assert not p.out_of_distribution({"input": digits_bundles.x_eval[:64]}, 0.2)
    assert p.out_of_distribution({"input": np.full((2, 64), 16.0, np.float32)}, 0.2)
