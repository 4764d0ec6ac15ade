"""The fine latency histogram on the wire: edges, exact collapse, parsing, the agent's counts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import validate

from bundles import DigitsBundles
from edge_agent.bundle import read_bundle
from edge_agent.config import DriftConfig, ModelPolicy
from edge_agent.errors import ContractError
from edge_agent.runtime.loader import load_runtime
from edge_agent.serving.pipeline import ModelPipeline
from edge_agent.wire.telemetry import (
    LATENCY_BUCKETS_MS,
    LATENCY_FINE_BUCKETS_MS,
    ModelStats,
    TelemetryReport,
    coarse_from_fine,
    latency_histogram,
    report_from_status,
)

FINE = LATENCY_FINE_BUCKETS_MS
SCHEMA = json.loads(
    (
        Path(__file__).resolve().parents[2] / "src/edge_agent/schemas/telemetry-report.schema.json"
    ).read_text()
)


def fine_histogram(ms: np.ndarray) -> tuple[int, ...]:
    idx = np.searchsorted(np.asarray(FINE), ms, side="left")
    return tuple(int(c) for c in np.bincount(idx, minlength=len(FINE) + 1))


def test_fine_edges_refine_the_coarse_ones() -> None:
    assert list(FINE) == sorted(set(FINE))
    assert FINE[0] == 0.05
    assert FINE[-1] == LATENCY_BUCKETS_MS[-1]
    assert set(LATENCY_BUCKETS_MS) <= set(FINE)
    ratios = np.diff(np.log10(FINE))
    assert ratios.max() < 0.11  # at most ~26 % apart


@pytest.mark.parametrize("seed", range(20))
def test_collapse_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ms = np.concatenate(
        [rng.lognormal(rng.uniform(-4, 8), rng.uniform(0.1, 2), 500), [*FINE, *LATENCY_BUCKETS_MS]]
    )
    assert coarse_from_fine(fine_histogram(ms)) == latency_histogram(ms.tolist())


def stats(**kw: Any) -> dict[str, Any]:
    fine = fine_histogram(np.array([0.01, 0.06, 0.9, 1.0, 1.5, 30.0, 9000.0]))
    d = ModelStats(version=2, latency_buckets=coarse_from_fine(fine), latency_fine=fine).to_dict()
    d.update(kw)
    return d


def test_round_trip_and_schema() -> None:
    d = stats()
    m = ModelStats.from_dict(d)
    assert m.latency_fine is not None
    assert m.to_dict() == d
    report = TelemetryReport("dev-1", 1, 0.0, 1.0, models={"digits": m})
    validate(json.loads(report.to_bytes()), SCHEMA)


def test_old_form_has_no_key_and_parses_without_it() -> None:
    d = stats()
    del d["latency_fine"]
    m = ModelStats.from_dict(d)
    assert m.latency_fine is None
    assert "latency_fine" not in m.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        [0] * 51,  # too short
        [0] * 53,  # too long
        [-1] + [0] * 51,  # negative
        [0.5] + [0] * 51,  # not an integer
        "x",
        [0] * 52,  # does not add up to latency_buckets
    ],
)
def test_bad_fine_histograms_are_refused(bad: Any) -> None:
    with pytest.raises(ContractError):
        ModelStats.from_dict(stats(latency_fine=bad))


def test_report_from_status_derives_coarse_from_fine() -> None:
    fine = fine_histogram(np.array([0.02, 0.3, 3.0]))
    status = {
        "agent_version": "x",
        "models": {
            "digits": {
                "version": 1,
                "requests": 3,
                "latency_buckets": [9] * 12,  # a stale read: the fine one wins
                "latency_fine": list(fine),
            }
        },
    }
    report = report_from_status("dev-1", 1, status, (), 1.0, window_start=0.0)
    m = next(iter(report.models.values()))
    assert m.latency_fine == fine
    assert m.latency_buckets == coarse_from_fine(fine)
    TelemetryReport.from_bytes(report.to_bytes())  # and it parses strictly


def test_the_pipeline_counts_fine_and_coarse_alike(digits_bundles: DigitsBundles) -> None:
    loaded = read_bundle(
        digits_bundles.path(1),
        digits_bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    p = ModelPipeline(
        loaded.manifest, load_runtime(loaded.artifact, "onnx"), ModelPolicy(), DriftConfig()
    )
    for i in range(50):
        p.run({"input": digits_bundles.x_eval[i : i + 1]})
    fine = p.latency_histogram_fine()
    assert len(fine) == len(FINE) + 1
    assert sum(fine) == 50
    assert p.latency_histogram() == list(coarse_from_fine(fine))
