"""Operator queries against 1 day and 30 days of telemetry history, on SQLite and PostgreSQL.

Fills a registry the way a running server would hold it at simulated time ``END``, for
``--devices`` devices reporting every 30 s:

- raw rows for the last ``--raw-minutes`` (default 75), stored through the registry's ingest
  path (``Registry.ingest_many``, the call the gateway's batching makes; payloads shaped like
  the agent's digits report: cumulative counters, latency histogram, rejects by reason and, on
  every second report, tier-A windows of the 64-feature input and the 10-class output);
- the history job (``fleet_server.history.HistoryJob.run_once``) folds them into 5-minute and
  hourly rollups, as ``serve`` does every 30 s;
- older history exists only as rollups (that is the point of retention): the folded rollups of
  one real bucket are cloned back in time, 5-minute ones for ``--fine-days`` (the default
  retention of 1 day, capped at the history) and hourly ones for the whole history.

Then it times (median of ``--repeats``): status (list devices and bundles), a device page
(device, seq state, desired state, its newest 20 telemetry rows), telemetry tail (newest 100),
``drift report`` by group with per-device cells over the last hour and the last day, and one
rollout step's observations of a 250-device group whose rollout started 2 h ago. The 1-day
registry is extended in place to 30 days and timed again. It prints a markdown table, the ratio
30 d / 1 d, and the measured storage per row and per day per 1,000 devices with and without
retention. Raw rows are kept only for the last ``--raw-minutes``: queries read at most the
current partial bucket of them, so a longer raw retention changes the table's size, not what a
query reads (the raw storage per day is measured from these rows).

    .venv/bin/python bench/bench_history.py [--devices 1000] [--backends sqlite postgresql]
        [--days 1 30] [--raw-minutes 75] [--fine-days 1] [--repeats 3]

About 10 minutes at the defaults on 2 cores; ``--devices 200`` for a quick run.

``--retention`` measures the cost of retention instead: ``--raw-minutes`` of reports of
``--devices`` devices on one simulated day, then removed as retention removes them. On
PostgreSQL twice, in two databases: the day in its own partition (``DROP TABLE`` of it,
``history.retention.drop_partitions``) and the same rows in the default partition (batched
deletes of ``delete_batch`` rows, ``delete_raw_batch``, as PostgreSQL retention did before
partitioning), with what each leaves on disk and the ``VACUUM`` that batched deletes still
need; on SQLite the batched deletes. Keys are pruned after, in batches (timed apart). It
prints one table.

    .venv/bin/python bench/bench_history.py --retention --devices 100 --raw-minutes 120

``--ingest`` measures ingest instead: rows per second through ``Registry.ingest_many`` for
``--raw-minutes`` of reports of ``--devices`` devices, new and then all redelivered (median of
``--repeats`` fresh registries). It imports nothing newer than ``Registry``, so it also runs
against an older source tree, for a before/after comparison:

    git archive 2e79cb2 src | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/src .venv/bin/python bench/bench_history.py --ingest
    .venv/bin/python bench/bench_history.py --ingest

``--migration ROWS`` times migration ``0006`` instead: a registry at revision ``0005`` holding
``ROWS`` raw rows (the same report payloads, over the last 3 simulated days) is upgraded, and
the rows per second of the upgrade are printed (on PostgreSQL: the copy into the partitioned
table, its indexes and the keys; ingest waits for all of it).

    .venv/bin/python bench/bench_history.py --migration 50000

``--keep DIR`` keeps the SQLite registry the run filled (``DIR/history.db``, bundles under
``DIR/sqlite``); ``--drift-cpu DIR`` then times the two drift reports on it in process CPU time
(SQLite runs in the process: the whole report's work, much steadier than wall-clock time on a
shared machine), also against an older source tree:

    .venv/bin/python bench/bench_history.py --backends sqlite --days 1 --keep /tmp/h1000
    .venv/bin/python bench/bench_history.py --drift-cpu /tmp/h1000 --repeats 5
    PYTHONPATH=/tmp/before/src .venv/bin/python bench/bench_history.py --drift-cpu /tmp/h1000

``--drift-storage`` times reading the drift rollups of the last day (``history.drift_inputs``,
what the drift report reads and sums before scoring) as stored now (narrow integers) against
the same rollups stored as before (int64 arrays, copied under version 4), alternating rounds
in one registry, and prints the ratio:

    .venv/bin/python bench/bench_history.py --drift-storage --raw-minutes 65
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from edge_agent.drift import TierASketch, build_baseline
from fleet_server.drift.cohorts import CohortSpec
from fleet_server.drift.service import DriftQuery, DriftService
from fleet_server.history.cells import DriftPart, drift_slices
from fleet_server.history.queries import drift_inputs
from fleet_server.history.rollouts import rollout_inputs
from fleet_server.jobs.history import FINE, HOUR, HistoryJob, HistoryPolicy
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import TelemetryRollup, TelemetryRow
from fleet_server.registry.values import TelemetryEntry
from fleet_server.rollouts.observation import observe
from fleetworkers import PgCluster

END = datetime(2026, 6, 30, 12, 7, 13, tzinfo=UTC)
INTERVAL = 30.0
GROUPS = 10
ROLLOUT_DEVICES = 250


class Clock:
    def __init__(self) -> None:
        self.now = END

    def __call__(self) -> datetime:
        return self.now


# --------------------------------------------------------------------------- payloads
def _bundle(tmp: Path) -> tuple[bytes, Any]:
    """A digits-like bundle: 64-feature input, 10-class output baseline (same code as builder)."""
    import dataclasses

    from model_builder.keystore import KeyStore
    from model_builder.package import package_bundle
    from support import NOW, make_manifest

    rng = np.random.default_rng(1)
    baseline = build_baseline(
        {"image": rng.normal(size=(1000, 64))},
        {"probabilities": rng.dirichlet(np.ones(10), size=1000)},
        n_bins=8,
    )
    artifact = b"digits-model" * 10
    # Published as digits v3 below: the manifest must say so, or the drift report finds no
    # baseline for v3 and skips every window unscored.
    manifest = dataclasses.replace(make_manifest(artifact, version=3), baseline=baseline)
    store = KeyStore.init(tmp / "keys", now=NOW)
    return package_bundle(manifest, artifact, store, now=NOW, expires_days=3650), baseline


def _view_pool(baseline: Any, n: int = 24) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(2)
    pool = []
    for _ in range(n):
        windows = []
        for tensor, role, make in (
            ("image", "input", lambda: rng.normal(size=(200, 64))),
            ("probabilities", "output", lambda: rng.dirichlet(np.ones(10), size=200)),
        ):
            sketch = TierASketch(baseline.view(tensor, role).edges)
            sketch.update(make())
            view = base64.b64encode(sketch.view().to_bytes()).decode()
            windows.append({"tensor": tensor, "role": role, "view": view, "rows": 200,
                            "alert": False, "max_psi": 0.01, "reason": "rows"})  # fmt: skip
        pool.append(windows)
    return pool


def _report(i: int, k: int, pool: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Device ``k``'s ``i``-th report (counters cumulative since its start)."""
    n = 100 * i + k % 7
    lat = [0] * 12
    lat[1], lat[2], lat[3] = n // 2, n // 3, n - n // 2 - n // 3
    stats: dict[str, Any] = {
        "version": 3,
        "outcomes": {"ok": n, "error": i // 50, "rejected": i // 10},
        "sources": {"device": n - i // 20, "cloud": i // 20},
        "latency_buckets": lat,
        "latency_ms": {"p50": 1.8, "p90": 4.2, "p99": 31.0},
        "rejects_by_reason": {"nan": i // 10},
        "dropped_rows_by_reason": {},
    }
    if i % 2 == 0:
        stats["drift"] = pool[(i + k) % len(pool)]
    return {
        "schema_version": 1, "type": "report", "agent_version": "0.1.0", "started_at": 1.0,
        "window_start": 0.0, "window_end": 0.0, "models": {"digits": stats},
        "counts": {"device": n, "cloud": 0, "errors": 0, "rejected": 0},
        "resources": {"cpu_seconds": 12.5, "rss_bytes": 52428800, "model_memory_bytes": 10**6},
    }  # fmt: skip


# --------------------------------------------------------------------------- filling
def fill_raw(reg: Registry, clock: Clock, devices: list[str], minutes: float, pool: Any) -> int:
    """Reports of every device every 30 s over the last ``minutes`` (staggered in the 30 s)."""
    steps = int(minutes * 60 / INTERVAL)
    start = END - timedelta(seconds=steps * INTERVAL)
    stored = 0
    chunk = 100
    for i in range(steps):
        for lo in range(0, len(devices), chunk):
            part = devices[lo : lo + chunk]
            clock.now = start + timedelta(seconds=i * INTERVAL + INTERVAL * lo / len(devices))
            items = [
                (d, [TelemetryEntry(i + 1, "report", _report(i, lo + j, pool))], None)
                for j, d in enumerate(part)
            ]
            reg.ingest_many(items)
            stored += len(items)
    clock.now = END
    return stored


def clone_history(reg: Registry, from_days: float, to_days: float, fine_days: float) -> int:
    """Clone the newest real folded 5-minute bucket and hour back in time: hours for
    ``[END - to_days, END - from_days)``, 5-minute buckets for the part of that range within
    ``fine_days``, always before the first bucket the raw rows produced."""
    with Session(reg.engine) as s:
        first_raw = s.scalar(select(func.min(TelemetryRow.received_at)))
        model: dict[int, list[dict[str, Any]]] = {}
        for level in (FINE, HOUR):
            at = s.scalar(
                select(func.max(TelemetryRollup.bucket_start)).where(
                    TelemetryRollup.bucket_seconds == level
                )
            )
            stmt = select(TelemetryRollup).where(
                TelemetryRollup.bucket_seconds == level, TelemetryRollup.bucket_start == at
            )
            model[level] = [
                {c.key: getattr(r, c.key) for c in TelemetryRollup.__mapper__.column_attrs}
                for r in s.scalars(stmt)
            ]
    assert first_raw is not None
    assert model[FINE]
    assert model[HOUR]
    targets: list[tuple[datetime, list[dict[str, Any]]]] = []
    for level, keep in ((FINE, min(fine_days, to_days)), (HOUR, to_days)):
        lo = END - timedelta(days=keep)
        hi = END - timedelta(days=min(from_days, keep))
        t = first_raw - timedelta(seconds=first_raw.timestamp() % level + level)
        while t >= lo:
            if t < hi:
                targets.append((t, model[level]))
            t -= timedelta(seconds=level)
    n = 0
    batch: list[dict[str, Any]] = []
    with reg.engine.begin() as c:
        for at, rows in targets:
            batch.extend({**r, "bucket_start": at} for r in rows)
            if len(batch) >= 5000:
                c.execute(insert(TelemetryRollup), batch)
                n, batch = n + len(batch), []
        if batch:
            c.execute(insert(TelemetryRollup), batch)
            n += len(batch)
    return n


def settle(reg: Registry) -> None:
    """Vacuum and analyze after the bulk clone, as autovacuum would have done by then: the
    cloned history arrives in one burst here, not one bucket every 5 minutes."""
    with reg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        if reg.engine.dialect.name == "postgresql":
            c.exec_driver_sql("VACUUM ANALYZE")
        else:
            c.exec_driver_sql("ANALYZE")


# --------------------------------------------------------------------------- queries
def _loadavg() -> float:
    """The 1-minute load average (wall-clock figures on a shared machine need it beside)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def queries(reg: Registry, bundles: Path, devices: list[str]) -> dict[str, Callable[[], Any]]:
    now = END + timedelta(seconds=5)
    drift = DriftService(reg, bundles, clock=lambda: now)
    group = devices[:ROLLOUT_DEVICES]
    started = now - timedelta(hours=2)

    def rollout_step() -> None:
        reg.list_devices()
        window = rollout_inputs(reg, "digits", dict.fromkeys(group, (started, 3)))
        for d in group:
            w = window[d]
            observe(d, "digits", 3, started, None, w.rows, folded=w.folded,
                    folded_events=w.events)  # fmt: skip

    def page() -> None:
        d = devices[len(devices) // 2]
        reg.get_device(d)
        reg.seq_state(d)
        reg.latest_desired(d)
        reg.telemetry(device_id=d, after_id=None, limit=20)

    by = CohortSpec.parse("group")
    return {
        "status": lambda: (reg.list_devices(), reg.list_bundles()),
        "device page": page,
        "telemetry tail": lambda: reg.telemetry(after_id=None, limit=100),
        "drift report, last hour": lambda: drift.report(
            DriftQuery("digits", by=by, since=(now - timedelta(hours=1)).timestamp())
        ),
        "drift report, last day": lambda: drift.report(
            DriftQuery("digits", by=by, since=(now - timedelta(days=1)).timestamp())
        ),
        f"rollout step ({ROLLOUT_DEVICES} devices, started 2 h ago)": rollout_step,
    }


def check_drift(qs: dict[str, Callable[[], Any]]) -> None:
    """The timed drift reports score every window: cohorts and device cells, nothing skipped."""
    for name, fn in qs.items():
        if name.startswith("drift report"):
            result = fn()
            every = {c.key.cohort for c in result.cohorts}
            if not result.skipped == {} or len(every) != GROUPS + 1:
                raise SystemExit(f"{name}: skipped {result.skipped}, cohorts {sorted(every)}")


# --------------------------------------------------------------------------- storage
def table_bytes(reg: Registry, path: Path | None) -> dict[str, float]:
    """Bytes per row of raw telemetry and of each rollup level (table + indexes)."""
    with reg.engine.connect() as c:
        raw_n = c.scalar(select(func.count()).select_from(TelemetryRow)) or 0
        levels = dict(
            c.execute(
                select(TelemetryRollup.bucket_seconds, func.count()).group_by(
                    TelemetryRollup.bucket_seconds
                )
            ).all()
        )
        raw_b = raw_bytes(reg)
        if reg.engine.dialect.name == "postgresql":
            roll_b = c.scalar(text("SELECT pg_total_relation_size('telemetry_rollups')")) or 0
        else:
            roll_b = sum(
                c.scalar(text(f"SELECT sum(pgsize) FROM dbstat WHERE name = '{n}'")) or 0
                for n in ("telemetry_rollups", "sqlite_autoindex_telemetry_rollups_1")
            )
    roll_n = sum(levels.values()) or 1
    return {"raw": raw_b / max(raw_n, 1), "rollup": roll_b / roll_n}


def raw_bytes(reg: Registry) -> int:
    """Bytes of raw telemetry on disk: every partition (PostgreSQL) and the dedupe keys, with
    their indexes."""
    with reg.engine.connect() as c:
        if reg.engine.dialect.name == "postgresql":
            parts = c.scalar(
                text(
                    "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                    "WHERE inhparent = to_regclass('telemetry')"
                )
            )
            keys = c.scalar(text("SELECT pg_total_relation_size('telemetry_keys')"))
            return int(parts or 0) + int(keys or 0)
        names = ("telemetry", "ix_telemetry_received_at", "ix_telemetry_device_id_received_at",
                 "telemetry_keys", "sqlite_autoindex_telemetry_keys_1",
                 "ix_telemetry_keys_received_at")  # fmt: skip
        return sum(
            int(c.scalar(text("SELECT sum(pgsize) FROM dbstat WHERE name = :n"), {"n": n}) or 0)
            for n in names
        )


# --------------------------------------------------------------------------- retention
def retention_cost(
    name: str, url: str, tmp: Path, a: argparse.Namespace, *, partitioned: bool
) -> dict[str, Any]:
    """Fill one day with raw rows, then remove them as retention does; timed."""
    # Imported here: --ingest also runs against source trees older than these names.
    from fleet_server.history import retention
    from fleet_server.registry.tables.core import TelemetryKey

    clock = Clock()
    reg = Registry.open(url, clock=clock)
    reg.upgrade()
    _bundle_bytes, baseline = _bundle(tmp)
    devices = [f"dev-{i:05d}" for i in range(a.devices)]
    for i, d in enumerate(devices):
        reg.enroll(d, group=f"g{i % GROUPS}")
    if partitioned:  # the day's partition exists before ingest, as the job makes it ahead
        retention.ensure_partitions(reg, END - timedelta(minutes=a.raw_minutes), 1)
    t0 = time.perf_counter()
    stored = fill_raw(reg, clock, devices, a.raw_minutes, _view_pool(baseline))
    ingest_s = time.perf_counter() - t0
    # Not folded here: retention waits for the fold, but the fold is not what is measured (and
    # the job would move the default partition's rows into a new partition of their day).
    settle(reg)
    before = raw_bytes(reg)
    cut = END.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    batch = HistoryPolicy().delete_batch
    t0 = time.perf_counter()
    dropped = retention.drop_partitions(reg, cut) if partitioned else 0
    deleted = 0
    while True:
        n = retention.delete_raw_batch(reg, cut, batch)
        deleted += n
        if n < batch:
            break
    remove_s = time.perf_counter() - t0
    print(f"[{name}] {stored} rows; {dropped} partition dropped, {deleted} rows deleted "
          f"in {remove_s:.2f} s", file=sys.stderr)  # fmt: skip
    with reg.engine.connect() as c:
        left = int(c.scalar(select(func.count()).select_from(TelemetryRow)) or 0)
    after = raw_bytes(reg)
    t0 = time.perf_counter()
    keys = 0
    while True:
        n = retention.prune_keys_batch(reg, cut, batch)
        keys += n
        if n < batch:
            break
    keys_s = time.perf_counter() - t0
    vacuum_s = 0.0
    if name == "postgresql":
        t0 = time.perf_counter()
        with reg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM telemetry_default, telemetry_keys")
        vacuum_s = time.perf_counter() - t0
    vacuumed = raw_bytes(reg)
    with reg.engine.connect() as c:
        keys_left = int(c.scalar(select(func.count()).select_from(TelemetryKey)) or 0)
    reg.close()
    assert left == 0, f"{left} raw rows left"
    assert keys_left == 0, f"{keys_left} keys left"
    return {
        "rows": stored, "ingest_s": ingest_s, "dropped": dropped, "deleted": deleted,
        "remove_s": remove_s, "before": before, "after": after, "keys": keys,
        "keys_s": keys_s, "vacuum_s": vacuum_s, "vacuumed": vacuumed,
    }  # fmt: skip


def main_retention(a: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-retention-") as td:
        tmp = Path(td)
        for name in a.backends:
            if name == "sqlite":
                (tmp / "sqlite").mkdir()
                url = f"sqlite:///{tmp / 'retention.db'}"
                results["sqlite, batched deletes"] = retention_cost(
                    name, url, tmp / "sqlite", a, partitioned=False
                )
                continue
            pg = PgCluster()
            pg.start()
            try:
                for label, part in (("day partition dropped", True),
                                    ("default partition, batched deletes", False)):  # fmt: skip
                    (tmp / label).mkdir()
                    url = pg.create_database("p" if part else "d")
                    results[f"postgresql, {label}"] = retention_cost(
                        name, url, tmp / label, a, partitioned=part
                    )
            finally:
                pg.stop()
    print(f"\n{a.devices} devices x {a.raw_minutes:g} min of reports every 30 s, then removed "
          f"by retention; {os.cpu_count()} cores\n")  # fmt: skip
    print("| backend, how | rows | remove raw rows | raw bytes before | raw bytes after "
          "| VACUUM after (default partition, keys) | prune keys |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        vac = "-"
        if label.startswith("postgresql"):
            vac = f"{r['vacuum_s']:.2f} s, then {r['vacuumed'] / 1e6:.1f} MB"
        print(f"| {label} | {r['rows']:,} | {r['remove_s']:.2f} s "
              f"({r['dropped']} partition, {r['deleted']:,} rows deleted) | "
              f"{r['before'] / 1e6:.1f} MB | {r['after'] / 1e6:.1f} MB | {vac} | "
              f"{r['keys']:,} in {r['keys_s']:.2f} s |")  # fmt: skip
    for label, r in results.items():
        print(f"\n{label}: ingest of {r['rows']:,} rows (keys included) took "
              f"{r['ingest_s']:.1f} s through Registry.ingest_many")  # fmt: skip


# --------------------------------------------------------------------------- ingest
def ingest_rate(url: str, tmp: Path, a: argparse.Namespace) -> tuple[float, float]:
    """Rows per second through ``ingest_many``: new rows, then the same rows redelivered."""
    clock = Clock()
    reg = Registry.open(url, clock=clock)
    reg.upgrade()
    _bundle_bytes, baseline = _bundle(tmp)
    devices = [f"dev-{i:05d}" for i in range(a.devices)]
    for d in devices:
        reg.enroll(d)
    pool = _view_pool(baseline)
    t0 = time.perf_counter()
    n = fill_raw(reg, clock, devices, a.raw_minutes, pool)
    new = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    fill_raw(reg, clock, devices, a.raw_minutes, pool)
    again = n / (time.perf_counter() - t0)
    reg.close()
    return new, again


def main_ingest(a: argparse.Namespace) -> None:
    import fleet_server

    src = Path(fleet_server.__file__).resolve().parents[1]
    rates: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-ingest-") as td:
        tmp = Path(td)
        pg = PgCluster() if "postgresql" in a.backends else None
        if pg is not None:
            pg.start()
        try:
            for i in range(a.repeats):
                for name in a.backends:
                    run = tmp / f"{name}-{i}"
                    run.mkdir()
                    if name == "sqlite":
                        url = f"sqlite:///{run / 'ingest.db'}"
                    else:
                        assert pg is not None
                        url = pg.create_database(f"ingest_{i}")
                    rates.setdefault(name, []).append(ingest_rate(url, run, a))
        finally:
            if pg is not None:
                pg.stop()
    print(f"\ningest through Registry.ingest_many, source {src}; {a.devices} devices x "
          f"{a.raw_minutes:g} min of reports every 30 s; {os.cpu_count()} cores; median of "
          f"{a.repeats}\n")  # fmt: skip
    print("| backend | new rows/s | redelivered rows/s |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        new = statistics.median(x for x, _ in r)
        again = statistics.median(y for _, y in r)
        print(f"| {name} | {new:,.0f} | {again:,.0f} |")


# --------------------------------------------------------------------------- migration
def migration_cost(url: str, tmp: Path, a: argparse.Namespace) -> tuple[float, int]:
    """Seconds to upgrade a 0005 registry holding ``a.migration`` raw rows to head."""

    reg = Registry.open(url)
    reg.upgrade("0005")
    _bundle_bytes, baseline = _bundle(tmp)
    pool = _view_pool(baseline)
    devices = [f"dev-{i:05d}" for i in range(a.devices)]
    for d in devices:
        reg.enroll(d)
    steps = -(-a.migration // len(devices))
    start = END - timedelta(days=3)
    step = timedelta(days=3) / steps
    sql = text(
        "INSERT INTO telemetry (device_id, epoch, seq, kind, received_at, payload) "
        "VALUES (:d, 1, :seq, 'report', :at, :payload)"
    )
    n = 0
    with reg.engine.begin() as c:
        for i in range(steps):
            rows = [
                {"d": d, "seq": i + 1, "at": start + i * step + timedelta(milliseconds=k),
                 "payload": json.dumps(_report(i, k, pool))}
                for k, d in enumerate(devices)
            ][: a.migration - n]  # fmt: skip
            c.execute(sql, rows)
            n += len(rows)
    settle(reg)
    t0 = time.perf_counter()
    reg.upgrade()
    seconds = time.perf_counter() - t0
    with reg.engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(TelemetryRow)) == n
    reg.close()
    return seconds, n


def main_migration(a: argparse.Namespace) -> None:
    out: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-migration-") as td:
        tmp = Path(td)
        for name in a.backends:
            (tmp / name).mkdir()
            if name == "sqlite":
                out[name] = migration_cost(f"sqlite:///{tmp / 'm.db'}", tmp / name, a)
                continue
            pg = PgCluster()
            pg.start()
            try:
                out[name] = migration_cost(pg.create_database("m"), tmp / name, a)
            finally:
                pg.stop()
    print(f"\nmigration 0005 -> 0006 of {a.migration:,} raw rows ({a.devices} devices, 3 days); "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| backend | rows | upgrade | rows/s |")
    print("|---|---:|---:|---:|")
    for name, (seconds, n) in out.items():
        print(f"| {name} | {n:,} | {seconds:.1f} s | {n / seconds:,.0f} |")


# --------------------------------------------------------------------------- drift storage
def _as_int64(drift: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A rollup's drift as stored before narrow integers: int64 arrays, no ``ints``."""
    parts, out = [], []
    for _tensor, _role, doc, data in drift_slices(drift, blob):
        part = DriftPart.from_doc(doc, data)
        ints = np.concatenate([part.counts.ravel(), part.nan, part.count]).astype("<i8")
        out.append(ints.tobytes() + np.concatenate([part.sum, part.sumsq]).astype("<f8").tobytes())
        parts.append({k: v for k, v in doc.items() if k != "ints"})
    return {**drift, "parts": parts}, b"".join(out)


def drift_storage(name: str, url: str, tmp: Path, a: argparse.Namespace) -> dict[str, float]:
    """Median seconds of ``drift_inputs`` over the last day, narrow (v3) and int64 (v4)."""
    clock = Clock()
    reg = Registry.open(url, clock=clock)
    reg.upgrade()
    _bundle_bytes, baseline = _bundle(tmp)
    devices = [f"dev-{i:05d}" for i in range(a.devices)]
    for i, d in enumerate(devices):
        reg.enroll(d, group=f"g{i % GROUPS}")
    fill_raw(reg, clock, devices, a.raw_minutes, _view_pool(baseline))
    HistoryJob(reg, clock=clock).run_once()
    clone_history(reg, 0.0, 1.0, 2 / 24)
    now = END + timedelta(seconds=5)
    since = now - timedelta(days=1, hours=1)
    with Session(reg.engine) as s, s.begin():
        rows = s.scalars(select(TelemetryRollup).where(TelemetryRollup.bucket_start >= since)).all()
        copies = []
        for r in rows:
            drift, blob = _as_int64(r.drift, r.drift_arrays)
            row = {c.key: getattr(r, c.key) for c in TelemetryRollup.__mapper__.column_attrs}
            copies.append({**row, "version": 4, "drift": drift, "drift_arrays": blob})
        for lo in range(0, len(copies), 5000):
            s.execute(insert(TelemetryRollup), copies[lo : lo + 5000])
    settle(reg)
    day = now - timedelta(days=1)
    times: dict[int, list[float]] = {3: [], 4: []}
    for _ in range(a.repeats):
        for version in (3, 4):
            t0 = time.perf_counter()
            found = drift_inputs(reg, "digits", version, day, now)
            times[version].append(time.perf_counter() - t0)
            assert len(found.parts) == 2 * a.devices
    reg.close()
    print(f"[{name}] narrow {times[3]}, int64 {times[4]}", file=sys.stderr)
    return {"narrow": statistics.median(times[3]), "int64": statistics.median(times[4])}


def main_drift_storage(a: argparse.Namespace) -> None:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-history-") as td:
        tmp = Path(td)
        for name in a.backends:
            (tmp / name).mkdir()
            if name == "sqlite":
                out[name] = drift_storage(name, f"sqlite:///{tmp / 'h.db'}", tmp / name, a)
                continue
            pg = PgCluster()
            pg.start()
            try:
                out[name] = drift_storage(name, pg.create_database("history"), tmp / name, a)
            finally:
                pg.stop()
    print(f"\nreading the last day's drift rollups ({a.devices} devices; "
          f"{os.cpu_count()} cores; median of {a.repeats}, alternating)\n")  # fmt: skip
    print("| backend | int64 arrays (before) | narrow arrays | int64 / narrow |")
    print("|---|---:|---:|---:|")
    for name, r in out.items():
        print(f"| {name} | {r['int64'] * 1000:.0f} ms | {r['narrow'] * 1000:.0f} ms | "
              f"{r['int64'] / r['narrow']:.2f} |")  # fmt: skip


# --------------------------------------------------------------------------- drift CPU time
def main_drift_cpu(a: argparse.Namespace) -> None:
    """Process CPU time of the two drift reports on a kept SQLite registry (``--keep``): the
    database is in the process, so this is the whole report's work, and far less noisy than
    wall-clock time on a shared machine. Rounds of hour and day alternate."""
    root = Path(a.drift_cpu)
    reg = Registry.open(f"sqlite:///{root / 'history.db'}", clock=Clock())
    qs = queries(reg, root / "sqlite" / "bundles", [])
    check_drift({k: v for k, v in qs.items() if k.startswith("drift report")})
    names = [k for k in qs if k.startswith("drift report")]
    times: dict[str, list[float]] = {k: [] for k in names}
    load = [_loadavg()]
    for _ in range(a.repeats):
        for k in names:
            t0 = time.process_time()
            qs[k]()
            times[k].append(time.process_time() - t0)
    load.append(_loadavg())
    print(f"drift report CPU time (process_time, median of {a.repeats}), {root}; "
          f"load average {load[0]:.1f}-{load[1]:.1f}")  # fmt: skip
    for k in names:
        print(f"| {k} | {statistics.median(times[k]) * 1000:.0f} ms CPU | "
              f"{min(times[k]) * 1000:.0f}-{max(times[k]) * 1000:.0f} ms |")  # fmt: skip
    reg.close()


# --------------------------------------------------------------------------- main
def run_backend(name: str, url: str, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    clock = Clock()
    reg = Registry.open(url, clock=clock)
    reg.upgrade()
    bundle, baseline = _bundle(tmp)
    bundles = tmp / "bundles"
    bundles.mkdir(exist_ok=True)
    sha = hashlib.sha256(bundle).hexdigest()
    (bundles / f"{sha}.bundle").write_bytes(bundle)
    reg.publish_bundle("digits", 3, channel="stable", sha256=sha, length=len(bundle),
                       targets_sha256="0" * 64)  # fmt: skip
    devices = [f"dev-{i:05d}" for i in range(a.devices)]
    for i, d in enumerate(devices):
        reg.enroll(d, group=f"g{i % GROUPS}")
    pool = _view_pool(baseline)
    t0 = time.perf_counter()
    stored = fill_raw(reg, clock, devices, a.raw_minutes, pool)
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    job = HistoryJob(reg, clock=clock)
    done = job.run_once()
    fold_s = time.perf_counter() - t0
    print(f"[{name}] {stored} reports ingested in {ingest_s:.1f} s; "
          f"{done.fine_buckets} 5-min + {done.hour_buckets} hourly buckets folded in "
          f"{fold_s:.1f} s", file=sys.stderr)  # fmt: skip
    out: dict[str, Any] = {"fold_s_per_bucket": fold_s / max(done.fine_buckets, 1)}
    previous_days = 0.0
    for days in a.days:
        t0 = time.perf_counter()
        n = clone_history(reg, previous_days, days, a.fine_days)
        print(f"[{name}] history to {days} d: +{n} rollup rows in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
        previous_days = days
        settle(reg)
        qs = queries(reg, bundles, devices)
        check_drift(qs)
        load = [_loadavg()]
        out[days] = {k: _timed(fn, a.repeats) for k, fn in qs.items()}
        load.append(_loadavg())
        out.setdefault("load", []).extend(load)
        for k, v in out[days].items():
            print(f"[{name}] {days} d  {k}: {v * 1000:.0f} ms (load {load})", file=sys.stderr)
    if name == "sqlite":
        with reg.engine.connect() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    out["bytes"] = table_bytes(reg, None)
    reg.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument("--days", nargs="+", type=float, default=[1.0, 30.0])
    ap.add_argument("--raw-minutes", type=float, default=75.0)
    ap.add_argument("--fine-days", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--retention", action="store_true", help="measure retention's cost instead")
    ap.add_argument("--ingest", action="store_true", help="measure ingest's rate instead")
    ap.add_argument("--migration", type=int, default=0, help="time migration 0006 of N rows")
    ap.add_argument("--drift-storage", action="store_true", help="time narrow vs int64 rollups")
    ap.add_argument("--keep", help="fill the SQLite registry in this new directory and keep it")
    ap.add_argument("--drift-cpu", help="CPU time of the drift reports on a --keep directory")
    a = ap.parse_args()
    if a.drift_cpu:
        main_drift_cpu(a)
        return
    if a.drift_storage:
        main_drift_storage(a)
        return
    if a.migration:
        main_migration(a)
        return
    if a.retention:
        main_retention(a)
        return
    if a.ingest:
        main_ingest(a)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-history-") as td:
        tmp = Path(td)
        for name in a.backends:
            if name == "sqlite":
                keep = Path(a.keep) if a.keep else tmp
                keep.mkdir(exist_ok=True)
                (keep / "sqlite").mkdir()
                results[name] = run_backend(name, f"sqlite:///{keep / 'history.db'}",
                                            keep / "sqlite", a)  # fmt: skip
            else:
                pg = PgCluster()
                pg.start()
                try:
                    (tmp / "pg").mkdir()
                    results[name] = run_backend(name, pg.create_database("history"),
                                                tmp / "pg", a)  # fmt: skip
                finally:
                    pg.stop()
    _print(results, a)


def _print(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> None:
    d0, d1 = a.days[0], a.days[-1]
    print(f"\n{a.devices} devices, one report per 30 s; {os.cpu_count()} cores; median of "
          f"{a.repeats}\n")  # fmt: skip
    head = "| query | " + " | ".join(f"{b} {d0:g} d | {b} {d1:g} d | ratio" for b in results) + " |"
    print(head)
    print("|---|" + "---:|---:|---:|" * len(results))
    first = next(iter(results.values()))
    for q in first[d0]:
        cells = []
        for r in results.values():
            x, y = r[d0][q], r[d1][q]
            cells.append(f"{x * 1000:.0f} ms | {y * 1000:.0f} ms | {y / x:.2f}")
        print(f"| {q} | " + " | ".join(cells) + " |")
    per_day = 86400 / INTERVAL * 1000  # reports per day per 1,000 devices
    print("\nStorage per day per 1,000 devices (table + indexes, measured bytes per row):\n")
    print(
        "| backend | raw B/row | rollup B/row | raw, kept forever (today) | with retention: "
        "growth/day (hourly rollups) | bounded working set (3 d raw + 1 d 5-min) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        raw, roll = r["bytes"]["raw"], r["bytes"]["rollup"]
        raw_day = raw * per_day
        hour_day = roll * 24 * 1000
        fine_day = roll * 288 * 1000
        print(
            f"| {name} | {raw:,.0f} | {roll:,.0f} | {raw_day / 1e9:.1f} GB/day | "
            f"{hour_day / 1e6:.0f} MB/day | {(3 * raw_day + fine_day) / 1e9:.0f} GB |"
        )
    for name, r in results.items():
        lo, hi = min(r["load"]), max(r["load"])
        print(f"\n{name}: 1-minute load average {lo:.1f}-{hi:.1f} while the queries were timed")
    for name, r in results.items():
        print(
            f"\n{name}: folding one 5-minute bucket of {a.devices} devices took "
            f"{r['fold_s_per_bucket']:.2f} s (the job does one per 5 minutes)"
        )


if __name__ == "__main__":
    main()
