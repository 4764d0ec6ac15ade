"""Telemetry reports of every released form still parse, byte for byte, and judge alike.

``telemetry-v1-2026-12/``: ``report-coarse-*.json`` were written by the agent before the fine
latency histogram (``latency_buckets`` only); ``report-fine-*.json`` by the agent that adds
``latency_fine``. Fixtures are added, never regenerated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, TelemetryReport, coarse_from_fine
from fleet_server.rollouts.gates import latency_histograms
from fleet_server.rollouts.metrics import WindowMetrics
from fleet_server.rollouts.observation import observe

DIR = Path(__file__).parent / "telemetry-v1-2026-12"
FILES = sorted(DIR.glob("report-*.json"))
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_both_forms_are_there() -> None:
    names = {p.name for p in FILES}
    assert {"report-coarse-1.json", "report-fine-1.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_report_parses_and_round_trips(path: Path) -> None:
    data = path.read_bytes()
    report = TelemetryReport.from_bytes(data)
    assert report.to_bytes() == data  # an old report stays byte-identical
    m = report.models["digits"]
    if "coarse" in path.name:
        assert m.latency_fine is None
    else:
        assert m.latency_fine is not None
        assert coarse_from_fine(m.latency_fine) == m.latency_buckets


@dataclass(frozen=True)
class Row:
    seq: int
    kind: str
    received_at: datetime
    payload: dict[str, Any]


def observed(prefix: str) -> WindowMetrics:
    paths = sorted(DIR.glob(f"report-{prefix}-*.json"))
    rows = [
        Row(i, "report", T0 + timedelta(seconds=i), json.loads(p.read_bytes()))
        for i, p in enumerate(paths)
    ]
    return observe(f"dev-{prefix}", "digits", 1, T0, None, rows).metrics


def test_the_server_merges_old_and_new_agents_like_with_like() -> None:
    old, new = observed("coarse"), observed("fine")
    assert sum(old.latency_buckets) == 200  # 300 - 100 between the two old reports
    assert sum(old.latency_fine) == 0  # an old agent's interval adds no fine counts
    assert sum(new.latency_fine) == sum(new.latency_buckets) == 300
    # New agents on both sides: fine; an old agent on either side: coarse on both.
    assert latency_histograms(new, new)[3] == "fine"
    mixed = old.merge(new)
    assert latency_histograms(mixed, new)[3] == "coarse"
    assert latency_histograms(new, mixed)[3] == "coarse"
    b1, _, edges, _ = latency_histograms(mixed, mixed)
    pairs = zip(old.latency_buckets, new.latency_buckets, strict=True)
    assert list(b1) == [a + b for a, b in pairs]
    assert edges == LATENCY_BUCKETS_MS
