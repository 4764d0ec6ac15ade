"""The console's fleet drift page over a real scored fleet (``score_fleet``, the function
``DriftService.report`` ends in): per cohort and version a chart of one feature's bucket
shares against the baseline, with axes, labels and scores; the drifted features; hostile
cohort and tensor names escaped. ``DriftService``'s reading is tested in
``tests/unit/test_fleet_drift_service.py``; here a stand-in returns the scored result."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from console_world import ConsoleWorld, login
from starlette.testclient import TestClient

from edge_agent.drift import TierASketch, build_baseline
from fleet_server.drift.cohorts import CohortSpec, DeviceInfo, FleetWindow
from fleet_server.drift.fleet import FleetAccumulator, score_fleet
from fleet_server.drift.results import FleetDriftResult
from fleet_server.drift.service import DriftQuery

F = 4
HOSTILE = "<script>alert(1)</script>"


def _result(tensor: str, hot: str) -> FleetDriftResult:
    base = build_baseline({tensor: np.random.default_rng(1).normal(size=(3000, F))}, {})
    view = base.view(tensor)
    acc = FleetAccumulator(CohortSpec("group"))
    rng = np.random.default_rng(2)
    for i in range(8):
        sketch = TierASketch.zero(view.edges)
        sketch.update(rng.normal(size=(400, F)) + (np.array([0, 1.0, 0, 0]) if i < 4 else 0))
        acc.add(FleetWindow(f"d{i}", "digits", 3, tensor, "input", 0.0, sketch.view()),
                DeviceInfo(hot if i < 4 else "cold"), view)  # fmt: skip
    cells, devices = acc.merged()
    return score_fleet(cells, {("digits", 3, tensor, "input"): view},
                       spec=CohortSpec("group"), device_cells=devices)  # fmt: skip


class Drift:
    """Stands in for ``DriftService``: the clock and a scored result; records the queries."""

    def __init__(self, result: FleetDriftResult) -> None:
        self.result = result
        self.queries: list[DriftQuery] = []

    def now(self) -> datetime:
        return datetime(2026, 3, 1, tzinfo=UTC)

    def report(self, query: DriftQuery) -> FleetDriftResult:
        self.queries.append(query)
        return self.result


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    w.registry.publish_bundle("digits", 3, channel="stable", sha256="3" * 64, length=10,
                              targets_sha256="4" * 64)  # fmt: skip
    yield w
    w.close()


def _client(world: ConsoleWorld, drift: Drift) -> TestClient:
    world.drift = drift  # type: ignore[assignment]
    return TestClient(world.app())


def test_drift_page_charts_each_cohort_against_the_baseline(world: ConsoleWorld) -> None:
    drift = Drift(_result("x", "hot"))
    with _client(world, drift) as c:
        login(c, "viv")
        r = c.get("/console/drift", params={"model": "digits", "version": "3", "by": "group",
                                            "since": "24h", "feature": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
    [q] = drift.queries
    assert (q.model, q.version, str(q.by)) == ("digits", 3, "group")
    assert r.text.count("<svg") == 3  # the fleet, hot and cold
    for cohort in ("* (v3)", "hot (v3)", "cold (v3)"):
        assert cohort in r.text
    assert r.text.count('class="bar-drift"') > 0  # a drifted cohort is drawn red
    assert "bucket (underflow, bins, overflow)" in r.text  # the x axis is labelled
    assert "psi_threshold" in r.text
    drifted = r.text.split("<h2>Drifted features</h2>")[1]
    assert "d0" in drifted
    assert "d5" not in drifted


def test_a_feature_out_of_range_is_an_error_page(world: ConsoleWorld) -> None:
    with _client(world, Drift(_result("x", "hot"))) as c:
        login(c, "viv")
        r = c.get("/console/drift", params={"model": "digits", "feature": str(F)})
    assert r.status_code == 400
    assert "features 0..3" in r.text


def test_hostile_cohort_and_tensor_names_are_escaped(world: ConsoleWorld) -> None:
    with _client(world, Drift(_result(f"t{HOSTILE}", f"g{HOSTILE}"))) as c:
        login(c, "viv")
        r = c.get("/console/drift", params={"model": "digits", "feature": "1"})
    assert r.status_code == 200, r.text
    assert HOSTILE not in r.text
    assert "g&lt;script&gt;alert(1)&lt;/script&gt; (v3)" in r.text
    assert "t&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
