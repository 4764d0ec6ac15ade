"""fleet_server.rollouts.observation.observe on real TelemetryReport / Event payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import DriftSummary, Event, ModelStats, ShadowStats, TelemetryReport
from fleet_server.registry.values import StoredTelemetry
from fleet_server.rollouts.observation import observe

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEV = "dev-1"


def report(
    seq: int,
    version: int,
    ok: int,
    rejected: int = 0,
    cloud: int = 0,
    *,
    started: float = 1000.0,
    alerts: tuple[bool, ...] = (),
    compared: int = 0,
    agree: int = 0,
) -> TelemetryReport:
    drift = tuple(
        DriftSummary("probs", "output", 0.0, 1.0, "count", 100, b"v", a, max_psi=0.3 if a else 0.01)
        for a in alerts
    )
    buckets = [0] * 12
    buckets[3] = ok + rejected
    stats = ModelStats(
        version=version,
        outcomes={"ok": ok, "error": 0, "rejected": rejected},
        sources={"device": ok - cloud, "cloud": cloud},
        latency_buckets=tuple(buckets),
        drift=drift,
        shadow=ShadowStats(counts={"compared": compared, "agree_rows": agree}),
    )
    return TelemetryReport(DEV, seq, 0.0, 1.0, started_at=started, models={"digits": stats})


def rows(*items: tuple[int, TelemetryReport | Event]) -> list[StoredTelemetry]:
    out = []
    for minute, item in items:
        kind = "report" if isinstance(item, TelemetryReport) else "event"
        at = T0 + timedelta(minutes=minute)
        out.append(StoredTelemetry(item.seq, DEV, item.seq, kind, at, item.to_dict()))
    return out


def reported(**kw: Any) -> dict[str, Any]:
    return ReportedState(DEV, 0.0, "0.1", 3, {"digits": ModelReport(**kw)}).to_dict()


CASES = [
    (
        "differences of consecutive reports on the version",
        rows(
            (1, report(1, 2, 100)),
            (2, report(2, 2, 300, 10, 20)),
            (3, report(3, 2, 600, 30, 20)),
        ),
        {"reports": 2, "requests": 530, "rejected": 30, "cloud_answers": 20},
    ),
    (
        "the switch from v1 to v2 is only a baseline",
        rows((1, report(1, 1, 5000)), (2, report(2, 2, 100)), (3, report(3, 2, 150))),
        {"reports": 1, "requests": 50},
    ),
    (
        "an agent restart starts a new baseline",
        rows(
            (1, report(1, 2, 100)),
            (2, report(2, 2, 40, started=2000.0)),
            (3, report(3, 2, 90, started=2000.0)),
        ),
        {"reports": 1, "requests": 50},
    ),
    (
        "reports before the window are baselines only",
        rows((-5, report(1, 2, 100)), (-1, report(2, 2, 200)), (1, report(3, 2, 260))),
        {"reports": 1, "requests": 60},
    ),
    (
        "drift windows and shadow counts",
        rows(
            (1, report(1, 2, 10, compared=100, agree=90)),
            (2, report(2, 2, 20, alerts=(True, False, True), compared=300, agree=250)),
        ),
        {"drift_windows": 3, "drift_alerts": 2, "max_psi": 0.3, "shadow_compared": 200,
         "shadow_agree": 160},
    ),
    (
        # each report is valid alone, but between them "agree" grew more than "compared": the
        # interval cannot be true, so it is dropped like a reset (a gate's interval would refuse it)
        "an interval whose shadow agreement outgrew its comparisons is dropped",
        rows(
            (1, report(1, 2, 10, compared=100, agree=90)),
            (2, report(2, 2, 20, compared=110, agree=110)),
            (3, report(3, 2, 30, compared=210, agree=200)),
        ),
        {"reports": 1, "requests": 10, "shadow_compared": 100, "shadow_agree": 90},
    ),
    (
        "other versions are not counted",
        rows((1, report(1, 1, 100)), (2, report(2, 1, 200))),
        {"reports": 0, "requests": 0},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("what", "items", "expected"), CASES, ids=[c[0] for c in CASES])
def test_window_metrics(what: str, items: list[StoredTelemetry], expected: dict[str, Any]) -> None:
    obs = observe(DEV, "digits", 2, T0, reported(active=2, assigned=2, outcome="installed"), items)
    for key, value in expected.items():
        assert getattr(obs.metrics, key) == value, key
    assert obs.reporting is (expected.get("reports", 1) > 0)


@pytest.mark.parametrize(
    ("state", "events", "failed", "rolled"),
    [
        ({"active": 2, "assigned": 2, "outcome": "installed"}, [], False, False),
        ({"active": 1, "assigned": 2, "outcome": "failed", "reason": "sig"}, [], True, False),
        ({"active": 1, "assigned": 2, "outcome": "rolled_back"}, [], False, True),
        ({"active": 1, "assigned": 2, "outcome": "pending"}, ["install_failed"], True, False),
        ({"active": 1, "assigned": 2, "outcome": "installed"}, ["rolled_back"], False, True),
        ({"active": 1, "assigned": 2, "outcome": "installed"}, ["probation_failed"], False, True),
    ],
)
def test_outcomes_from_reported_state_and_events(
    state: dict[str, Any], events: list[str], failed: bool, rolled: bool
) -> None:
    items = rows(
        *((1, Event(DEV, i + 1, k, 0.0, model="digits", version=2)) for i, k in enumerate(events))
    )
    obs = observe(DEV, "digits", 2, T0, reported(**state), items)
    assert obs.install_failed is failed
    assert obs.rolled_back is rolled
    assert obs.active_version == state["active"]


def test_events_of_other_versions_or_before_the_window_are_ignored() -> None:
    items = rows(
        (-1, Event(DEV, 1, "rolled_back", 0.0, model="digits", version=2)),
        (1, Event(DEV, 2, "install_failed", 0.0, model="digits", version=3)),
        (1, Event(DEV, 3, "install_failed", 0.0, model="other", version=2)),
    )
    obs = observe(DEV, "digits", 2, T0, None, items)
    assert not obs.install_failed
    assert not obs.rolled_back
    assert obs.active_version is None


def test_garbage_rows_are_skipped() -> None:
    bad = [
        StoredTelemetry(1, DEV, 1, "report", T0, {"models": "nope"}),
        StoredTelemetry(2, DEV, 2, "report", T0, {"models": {"digits": {"version": "x"}}}),
    ]
    obs = observe(DEV, "digits", 2, T0, {"models": []}, bad)
    assert obs.metrics.reports == 0
