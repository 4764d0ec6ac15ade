"""fleet_server.drift.service over a real SQLite registry, real bundles and real reports."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edge_agent.drift import DriftBaseline, DriftMonitor, MonitorPolicy
from edge_agent.wire.telemetry import DriftSummary, ModelStats, TelemetryReport
from fleet_server.drift.cohorts import FLEET, CohortSpec
from fleet_server.drift.service import DriftQuery, DriftService, parse_duration, parse_time
from fleet_server.errors import BaselineUnavailableError, FleetDriftError, ModelNotPublishedError
from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from model_builder.keystore import KeyStore
from support import NOW, make_bundle

T0 = 1_780_000_000.0
CLOCK = [datetime.fromtimestamp(T0, UTC)]


def _at(t: float) -> None:
    CLOCK[0] = datetime.fromtimestamp(t, UTC)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Registry, DriftService, DriftBaseline]]:
    # Windows are placed at their server receive time: ingest each seq at T0 + seq.
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=lambda: CLOCK[0])
    registry.upgrade()
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    store = KeyStore.init(tmp_path / "keys", now=NOW)
    for version in (1, 2):
        data = make_bundle(store, name="digits", version=version)
        sha = hashlib.sha256(data).hexdigest()
        (bundles / f"{sha}.bundle").write_bytes(data)
        registry.publish_bundle(
            "digits", version, channel="stable", sha256=sha, length=len(data),
            targets_sha256="0" * 64,
        )  # fmt: skip
    service = DriftService(registry, bundles, clock=lambda: datetime.fromtimestamp(T0 + 3600, UTC))
    yield registry, service, service.baseline("digits", 1)
    registry.close()


def _report(
    device: str, seq: int, baseline: DriftBaseline, shift: float, at: float
) -> TelemetryReport:
    monitor = DriftMonitor(baseline, MonitorPolicy(max_values=300, min_values=1))
    rng = np.random.default_rng([seq, sum(device.encode())])
    windows = monitor.observe("input", rng.normal(size=(600, 4)) + shift, now=1.0)
    stats = ModelStats(version=1, drift=tuple(map(DriftSummary.from_window, windows)))
    return TelemetryReport(device, seq, at - 60, at, models={"digits": stats})


def test_report_merges_cohorts_and_flags_the_shifted_group(fleet) -> None:  # type: ignore[no-untyped-def]
    registry, service, baseline = fleet
    for i in range(6):
        registry.enroll(f"dev-{i}", group="hot" if i < 3 else "cold", tags={"site": f"s{i % 2}"})
        shift = 3.0 if i < 3 else 0.0
        for seq in (1, 2):
            _at(T0 + seq)
            registry.ingest(f"dev-{i}", [_report(f"dev-{i}", seq, baseline, shift, T0 + seq)])
    bad = {"tensor": "input", "role": "input", "view": "!!"}
    payload = {"window_end": T0, "models": {"digits": {"version": 1, "drift": [bad]}}}
    _at(T0)
    registry.ingest("dev-0", [TelemetryEntry(3, "report", payload)])
    result = service.report(DriftQuery("digits", by=CohortSpec.parse("group")))
    by = {c.key.cohort: c for c in result.cohorts}
    assert set(by) == {FLEET, "hot", "cold"}
    assert by["hot"].windows == 12
    assert by["hot"].devices == ("dev-0", "dev-1", "dev-2")
    assert by["hot"].drifted
    assert not by["cold"].drifted
    assert {d.key.cohort for d in result.device_alerts} == {"dev-0", "dev-1", "dev-2"}
    assert result.skipped == {"bad_window": 1}
    assert result.devices_scored == 6

    late = service.report(DriftQuery("digits", since=T0 + 2))
    assert [c.windows for c in late.cohorts] == [12]  # seq 2 only: 6 devices x 2 windows
    assert by[FLEET].windows == 24
    none = service.report(DriftQuery("digits", until=T0))
    assert none.cohorts == ()
    tags = service.report(DriftQuery("digits", by=CohortSpec.parse("tag:site"), per_device=False))
    assert {c.key.cohort for c in tags.cohorts} == {FLEET, "s0", "s1"}
    assert tags.device_alerts == ()
    assert tags.devices_scored == 0


def test_windows_of_versions_without_a_readable_baseline_are_counted(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, service, baseline = fleet
    registry.enroll("dev-x")
    _at(T0)
    report = _report("dev-x", 1, baseline, 0.0, T0)
    stats = report.models["digits"]
    orphan = ModelStats(version=9, drift=stats.drift)
    registry.ingest(
        "dev-x", [report, TelemetryReport("dev-x", 2, T0, T0, models={"digits": orphan})]
    )
    result = service.report(DriftQuery("digits"))
    assert result.skipped == {"no_baseline": 2}
    assert [c.windows for c in result.cohorts] == [2]
    with pytest.raises(ModelNotPublishedError):
        service.report(DriftQuery("digits", version=9))
    other = DriftService(registry, tmp_path / "empty")
    with pytest.raises(BaselineUnavailableError):
        other.baseline("digits", 1)


def test_baseline_is_decoded_once(fleet, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _registry, service, _baseline = fleet
    import fleet_server.drift.service as mod

    calls = []
    real = mod.read_raw
    monkeypatch.setattr(mod, "read_raw", lambda p: calls.append(p) or real(p))
    service.baseline("digits", 2)
    service.baseline("digits", 2)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1780000000", 1780000000.0), ("2026-06-01T00:00:00", 1780272000.0),
     ("2026-06-01T02:00:00+02:00", 1780272000.0), ("2h", T0 - 3600),
     ("1d", T0 + 3600 - 86400)],
)  # fmt: skip
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, datetime.fromtimestamp(T0 + 3600, UTC)) == expected


@pytest.mark.parametrize("text", ["yesterday", "-2h", "0h", ""])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(FleetDriftError):
        parse_time(text, datetime.fromtimestamp(T0, UTC))


def test_parse_duration() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("1.5h") == 5400.0
