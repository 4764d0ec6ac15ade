"""Telemetry history on real SQLite and real PostgreSQL: rollups equal the raw aggregation,
retention keeps them, queries honour their time range, and a 0003 database upgrades."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from clock import FakeClock
from edge_agent.drift import DriftBaseline, DriftMonitor, MonitorPolicy
from edge_agent.wire.telemetry import DriftSummary
from fleet_server.drift.cohorts import CohortSpec
from fleet_server.drift.service import DriftQuery, DriftService
from fleet_server.history.cells import DriftPart, drift_slices
from fleet_server.history.rollouts import rollout_inputs
from fleet_server.jobs.history import FINE, HOUR, HistoryJob, HistoryPolicy
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import RollupState, TelemetryRollup, TelemetryRow
from fleet_server.registry.values import TelemetryEntry
from fleet_server.rollouts.observation import observe
from model_builder.keystore import KeyStore
from support import NOW, make_bundle

T0 = datetime(2026, 6, 1, 10, 2, 17, tzinfo=UTC)  # not on a bucket boundary
STEP = 37  # seconds between reports
N_REPORTS = 300  # ~3 h
DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture
def backend(registry_url: str) -> tuple[str, FakeClock]:
    """A fresh registry database on each backend (``registry_url``) and a clock at ``T0``."""
    return registry_url, FakeClock(wall=T0)


def _baseline_and_bundles(registry: Registry, tmp_path: Path) -> tuple[Path, DriftBaseline]:
    bundles = tmp_path / "bundles"
    bundles.mkdir(exist_ok=True)
    store = KeyStore.init(tmp_path / "keys", now=NOW)
    data = make_bundle(store, name="digits", version=1)
    sha = hashlib.sha256(data).hexdigest()
    (bundles / f"{sha}.bundle").write_bytes(data)
    registry.publish_bundle(
        "digits", 1, channel="stable", sha256=sha, length=len(data), targets_sha256="0" * 64
    )
    service = DriftService(registry, bundles)
    return bundles, service.baseline("digits", 1)


def _fill(registry: Registry, clock: FakeClock, baseline: DriftBaseline) -> None:
    """Reports every 37 s per device with cumulative counters, a restart, events, drift."""
    rng = np.random.default_rng(7)
    policy = MonitorPolicy(max_values=50, min_values=1)
    monitor = {d: DriftMonitor(baseline, policy) for d in DEVICES}
    totals: dict[str, dict[str, Any]] = {}
    for d in DEVICES:
        registry.enroll(d, group="g1" if d != "dev-c" else "g2")
        totals[d] = {"started": 1000.0, "ok": 0, "error": 0, "rejected": 0, "lat": [0] * 12,
                     "nan": 0}  # fmt: skip
    for i in range(N_REPORTS):
        for k, d in enumerate(DEVICES):
            clock.set_wall(T0 + timedelta(seconds=i * STEP + k))
            t = totals[d]
            if d == "dev-b" and i == 150:  # agent restart: counters start again
                t.update(started=2000.0, ok=0, error=0, rejected=0, lat=[0] * 12, nan=0)
            ok, rej = int(rng.integers(0, 20)), int(rng.integers(0, 3))
            t["ok"] += ok
            t["rejected"] += rej
            t["nan"] += rej
            t["error"] += int(rng.integers(0, 2))
            t["lat"][int(rng.integers(0, 12))] += ok
            stats: dict[str, Any] = {
                "version": 1,
                "outcomes": {"ok": t["ok"], "error": t["error"], "rejected": t["rejected"]},
                "sources": {"device": t["ok"], "cloud": 0},
                "latency_buckets": list(t["lat"]),
                "rejects_by_reason": {"nan": t["nan"]},
            }
            if i % 3 == 0:
                rows = np.round(rng.normal(size=(60, 4)) * 4) + (2 if d == "dev-c" else 0)
                windows = monitor[d].observe("input", rows, now=float(i))
                stats["drift"] = [DriftSummary.from_window(w).to_dict() for w in windows]
            payload = {"window_end": 1.0, "started_at": t["started"], "models": {"digits": stats}}
            entries = [TelemetryEntry(i * 2 + 1, "report", payload)]
            if i == 200 and d == "dev-a":
                ev = {"kind": "install_failed", "model": "digits", "version": 1}
                entries.append(TelemetryEntry(i * 2 + 2, "event", ev))
            registry.ingest(d, entries)


def _counts(registry: Registry, model: type[Any]) -> int:
    with registry.engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(model)) or 0)


def test_rollups_equal_raw_and_survive_retention(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, clock = backend
    registry = Registry.open(url, clock=clock.wall)
    registry.upgrade()
    bundles, baseline = _baseline_and_bundles(registry, tmp_path)
    _fill(registry, clock, baseline)
    end = clock.utc
    # Ranges start on 5-minute boundaries, the rollups' resolution, for an exact comparison.
    drift = DriftService(registry, bundles, clock=lambda: datetime(2026, 6, 1, 13, 10, tzinfo=UTC))
    since, until = datetime(2026, 6, 1, 10, 45, tzinfo=UTC), T0 + timedelta(hours=2, minutes=20)
    queries = [
        DriftQuery("digits", by=CohortSpec.parse("group")),
        DriftQuery("digits", since=since.timestamp(), until=until.timestamp()),
        DriftQuery("digits", since=T0.timestamp(), bucket_seconds=3600.0),
    ]
    windows = {d: (T0 + timedelta(minutes=27, seconds=43), 1) for d in DEVICES}
    before = [drift.report(q) for q in queries]
    raw_obs = rollout_inputs(registry, "digits", windows)
    assert all(not v.folded.reports for v in raw_obs.values())  # nothing folded yet: all raw

    later = FakeClock(wall=end + timedelta(minutes=2))
    job = HistoryJob(registry, HistoryPolicy(raw_retention_seconds=3600.0), clock=later.wall)
    report = job.run_once()
    assert report.fine_buckets > 30
    assert report.hour_buckets == 3
    assert report.raw_deleted > 0  # older than an hour and folded
    fine_done = job.folded_until(FINE)
    assert fine_done is not None
    assert end - timedelta(minutes=6) < fine_done <= end
    assert job.folded_until(HOUR) == datetime(2026, 6, 1, 13, tzinfo=UTC)
    with registry.engine.connect() as c:
        oldest = c.scalar(select(func.min(TelemetryRow.received_at)))
    assert oldest is not None
    assert oldest >= later.utc - timedelta(hours=1, minutes=1)

    # Drift from rollups (+ the raw tail) equals drift from raw rows, range by range.
    after = [drift.report(q) for q in queries]
    for b, a in zip(before, after, strict=True):
        assert [c.key for c in a.cohorts] == [c.key for c in b.cohorts]
        assert [c.windows for c in a.cohorts] == [c.windows for c in b.cohorts]
        assert [c.devices for c in a.cohorts] == [c.devices for c in b.cohorts]
        assert [f.psi for c in a.cohorts for f in c.features] == pytest.approx(
            [f.psi for c in b.cohorts for f in c.features]
        )
    everything = sum(c.windows for c in after[2].cohorts if c.key.cohort == "*")
    assert after[1].cohorts[0].windows < everything  # the range is honoured

    # Rollout observations from rollups equal observe() over the raw rows (taken before
    # retention deleted them).
    folded = rollout_inputs(registry, "digits", windows)
    assert any(v.folded.reports for v in folded.values())
    for d in DEVICES:
        raw = observe(d, "digits", 1, windows[d][0], None, raw_obs[d].rows)
        rolled = observe(
            d, "digits", 1, windows[d][0], None, folded[d].rows,
            folded=folded[d].folded, folded_events=folded[d].events,
        )  # fmt: skip
        assert rolled.metrics == raw.metrics
        assert rolled.install_failed == raw.install_failed
    assert _counts(registry, TelemetryRollup) > 0

    # Running again is a no-op (idempotent); a second job racing the first changes nothing.
    again = HistoryJob(registry, HistoryPolicy(raw_retention_seconds=3600.0), clock=later.wall)
    assert again.run_once().fine_buckets == 0
    registry.close()


def test_a_0003_database_upgrades_and_is_backfilled(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, clock = backend
    registry = Registry.open(url, clock=clock.wall)
    registry.upgrade("0003")
    with registry.engine.begin() as c:  # rows as 0003 wrote them (no history tables yet)
        c.exec_driver_sql(
            'INSERT INTO devices (id, "group", tags, enrolled_at, epoch) '
            "VALUES ('old-1', 'g', '{}', '2026-06-01 09:00:00+00:00', 1)"
        )
        for i in range(1, 21):
            stats = {"version": 2, "outcomes": {"ok": i * 10, "error": 0, "rejected": 0}}
            c.execute(
                text(
                    "INSERT INTO telemetry (device_id, epoch, seq, kind, received_at, payload) "
                    "VALUES ('old-1', 1, :seq, 'report', :at, :payload)"
                ),
                {
                    "seq": i,
                    "at": T0 + timedelta(seconds=60 * i),
                    "payload": json.dumps({"started_at": 5.0, "models": {"m": stats}}),
                },
            )
    registry.upgrade()
    assert registry.current_revision() == Registry.head_revision()
    clock.set_wall(T0 + timedelta(hours=3))
    HistoryJob(registry, clock=clock.wall).run_once()
    with registry.engine.connect() as c:
        rows = c.execute(
            select(TelemetryRollup.reports, TelemetryRollup.requests).where(
                TelemetryRollup.bucket_seconds == FINE
            )
        ).all()
    assert sum(r[0] for r in rows) == 19  # every difference between the 20 old reports
    assert sum(r[1] for r in rows) == 190
    registry.downgrade("0003")
    registry.upgrade()
    registry.close()


def test_racing_workers_fold_each_bucket_once_and_retention_waits_for_the_fold(  # type: ignore[no-untyped-def]
    backend, tmp_path: Path
) -> None:
    url, clock = backend
    registry = Registry.open(url, clock=clock.wall)
    registry.upgrade()
    _bundles, baseline = _baseline_and_bundles(registry, tmp_path)
    _fill(registry, clock, baseline)
    later = FakeClock(wall=clock.utc + timedelta(hours=10))
    raw_before = _counts(registry, TelemetryRow)

    # Nothing folded yet: however short the retention, no raw row may go.
    unfolded = HistoryPolicy(raw_retention_seconds=60.0, max_buckets_per_run=0)
    assert HistoryJob(registry, unfolded, clock=later.wall).run_once().raw_deleted == 0
    assert _counts(registry, TelemetryRow) == raw_before

    # Worker A reads a bucket; worker B folds everything before A commits: A's write is lost.
    keep = HistoryPolicy(raw_retention_seconds=86400.0)
    a, b = (
        HistoryJob(registry, keep, clock=later.wall),
        HistoryJob(registry, keep, clock=later.wall),
    )
    real = a._commit
    raced: list[bool] = []

    def commit_after_b(*args: Any) -> bool:
        if not raced:
            raced.append(True)
            b.run_once()
        return real(*args)

    a._commit = commit_after_b  # type: ignore[method-assign]
    a.run_once()
    with registry.engine.connect() as c:
        rows = c.execute(
            select(TelemetryRollup.bucket_seconds, TelemetryRollup.bucket_start, func.count())
            .group_by(TelemetryRollup.bucket_seconds, TelemetryRollup.bucket_start)
            .having(func.count() > len(DEVICES))
        ).all()
        reports = c.scalar(
            select(func.sum(TelemetryRollup.reports)).where(TelemetryRollup.bucket_seconds == FINE)
        )
    assert rows == []  # no bucket holds a device twice
    assert a.folded_until(FINE) == b.folded_until(FINE)
    assert reports == len(DEVICES) * (N_REPORTS - 1) - 1  # dev-b's restart is a new baseline
    registry.close()


def _restore_wide(registry: Registry, every: int) -> int:
    """Rewrite every ``every``-th stored rollup's drift the way rollups were stored before
    narrow integers: int64 arrays and entries without ``ints``. Returns the rows rewritten."""
    n = 0
    with Session(registry.engine) as s, s.begin():
        rows = s.scalars(
            select(TelemetryRollup).order_by(
                TelemetryRollup.bucket_seconds,
                TelemetryRollup.bucket_start,
                TelemetryRollup.device_id,
            )
        ).all()
        for i, r in enumerate(rows):
            if i % every or not r.drift.get("parts"):
                continue
            parts, blobs = [], []
            for tensor, role, doc, data in drift_slices(r.drift, r.drift_arrays):
                part = DriftPart.from_doc(doc, data)
                ints = np.concatenate([part.counts.ravel(), part.nan, part.count]).astype("<i8")
                floats = np.concatenate([part.sum, part.sumsq]).astype("<f8")
                blobs.append(ints.tobytes() + floats.tobytes())
                parts.append({k: v for k, v in doc.items() if k != "ints"} | {"tensor": tensor})
                assert parts[-1]["role"] == role
            r.drift = {**r.drift, "parts": parts}
            r.drift_arrays = b"".join(blobs)
            n += 1
    return n


def test_narrow_stored_counts_give_exactly_the_int64_report(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rollups store drift integers narrow; reports over them are exactly those over rollups
    stored as int64 (as before), all or mixed, also when the hours are folded again from int64
    fine rollups (a database written before) and after retention removed the fine rollups."""
    url, clock = backend
    registry = Registry.open(url, clock=clock.wall)
    registry.upgrade()
    bundles, baseline = _baseline_and_bundles(registry, tmp_path)
    _fill(registry, clock, baseline)
    later = FakeClock(wall=clock.utc + timedelta(minutes=2))
    HistoryJob(registry, clock=later.wall).run_once()
    with registry.engine.connect() as c:
        docs = c.execute(select(TelemetryRollup.drift)).scalars().all()
    codes = {p.get("ints") for d in docs for p in d["parts"]}
    assert codes <= {"<u1", "<u2"}  # the fill's counts are small: 1 or 2 bytes, not 8
    assert codes

    drift = DriftService(registry, bundles, clock=later.wall)
    hour = datetime(2026, 6, 1, 11, tzinfo=UTC)
    queries = [
        DriftQuery("digits", by=CohortSpec.parse("group"), since=T0.timestamp()),
        DriftQuery("digits", by=CohortSpec.parse("device"), since=T0.timestamp()),
        DriftQuery("digits", since=T0.timestamp(), bucket_seconds=1800.0),
        DriftQuery("digits", since=hour.timestamp(), until=(hour + timedelta(hours=2)).timestamp()),
        DriftQuery("digits", since=(later.utc - timedelta(minutes=50)).timestamp()),
    ]

    def reports() -> list[dict[str, Any]]:
        return [drift.report(q).to_dict(include_views=True) for q in queries]

    narrow = reports()
    assert any(r["device_alerts"] for r in narrow)  # device cells are in the comparison too
    assert _restore_wide(registry, every=2) > 0
    assert reports() == narrow
    assert _restore_wide(registry, every=1) > 0
    assert reports() == narrow

    # A database written before: its int64 fine rollups fold into (narrow) hours again.
    with registry.engine.begin() as c:
        c.execute(delete(TelemetryRollup).where(TelemetryRollup.bucket_seconds == HOUR))
        c.execute(
            update(RollupState)
            .where(RollupState.level == HOUR)
            .values(folded_until=datetime(2026, 6, 1, 10, tzinfo=UTC))
        )
    assert HistoryJob(registry, clock=later.wall).run_once().hour_buckets == 3
    assert reports() == narrow

    # Retention removes the fine rollups the hours hold: the hour-aligned range is unchanged.
    short = HistoryPolicy(fine_retention_seconds=60.0)
    assert HistoryJob(registry, short, clock=later.wall).run_once().rollups_deleted > 0
    assert drift.report(queries[3]).to_dict(include_views=True) == narrow[3]
    registry.close()
