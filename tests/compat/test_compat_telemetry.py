"""Telemetry reports of every released form still parse, byte for byte, and judge alike.

``telemetry-v1-2026-12/``: ``report-coarse-*.json`` were written by the agent before the fine
latency histogram (``latency_buckets`` only); ``report-fine-*.json`` by the agent that adds
``latency_fine``. Fixtures are added, never regenerated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.telemetry import TelemetryReport, coarse_from_fine

DIR = Path(__file__).parent / "telemetry-v1-2026-12"
FILES = sorted(DIR.glob("report-*.json"))


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
