"""The history job: folds closed buckets of raw telemetry into rollups, then applies retention.

Owns: ``HistoryPolicy`` (bucket sizes, retentions, batch sizes), ``HistoryJob.run_once`` (fold
every closed fine bucket, then every closed hour, then delete what retention allows, in small
batches) and when it runs (``start``/``close``). Does not own: the fold itself (``cells``),
reading history for queries (``queries``), the schema (``registry.tables.core``), the thread, its
leader-lock gate and its error boundary (``fleet_server.jobs.periodic``).

Why a job and not ingest: ingest stays as it is (one insert per batch, no read of the previous
report, no second table to lock per device), and a bucket is folded once, when it is closed,
from rows that can no longer change: ``received_at`` is the server's clock at ingest, so once
``now - grace`` has passed a bucket's end, no new row lands in it.

Idempotent and safe with several workers: a bucket is read and folded OUTSIDE any write
transaction; the short write transaction then moves ``rollup_state.folded_until`` from exactly
the bucket's start to its end (a compare-and-set ``UPDATE ... WHERE folded_until = start``), and
only if that row changed does it replace the bucket's rollups. A worker that lost the race rolls
back; a crash leaves the state at the last whole bucket, and the next run resumes there. Workers
also take the ``telemetry-history`` leader lock so only one does the work.

Retention never deletes a raw row that is not folded yet (nor a fine rollup not yet folded into
its hour), whatever the configured retention: the cut is ``min(now - retention, folded_until)``.
On PostgreSQL raw rows go by whole daily partitions (created ahead at each run, dropped once they
end at or before the cut; ``fleet_server.history.retention``); on SQLite, and for the default
partition on PostgreSQL, deletes go in batches of ``delete_batch`` rows by the indexed time
column, one short transaction each, so ingest (which on SQLite waits for the database write lock)
waits at most one batch. Dedupe keys older than the cut are pruned the same way, in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, func, insert, select, update

from fleet_server.history import retention
from fleet_server.history.cells import CellKey, RawRow, RollupCell, fold_rows, merge_cells
from fleet_server.history.queries import last_reports
from fleet_server.jobs.leader import LeaderLock
from fleet_server.jobs.periodic import PeriodicJob
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import Device, RollupState, TelemetryRollup, TelemetryRow

__all__ = ["FINE", "HOUR", "HistoryJob", "HistoryPolicy", "RunReport"]

log = logging.getLogger(__name__)

FINE = 300  # seconds per fine bucket (folded from raw rows)
HOUR = 3600  # seconds per coarse bucket (folded from fine rollups)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def floor_to(t: datetime, seconds: int) -> datetime:
    """``t`` rounded down to a multiple of ``seconds`` since the Unix epoch."""
    s = int((t - _EPOCH).total_seconds() // seconds) * seconds
    return _EPOCH + timedelta(seconds=s)


@dataclass(frozen=True)
class HistoryPolicy:
    """How long each level is kept and how the job paces itself (seconds, rows)."""

    raw_retention_seconds: float = 3 * 86400.0
    fine_retention_seconds: float = 1 * 86400.0
    hour_retention_seconds: float = 400 * 86400.0
    grace_seconds: float = 60.0
    delete_batch: int = 2000
    max_buckets_per_run: int = 2000
    max_delete_batches_per_run: int = 500
    partitions_ahead_days: int = 2  # PostgreSQL: daily partitions made ahead of today


@dataclass
class RunReport:
    """What one ``run_once`` did."""

    fine_buckets: int = 0
    hour_buckets: int = 0
    raw_deleted: int = 0
    rollups_deleted: int = 0
    partitions_created: int = 0
    partitions_dropped: int = 0
    keys_pruned: int = 0


class _LostRaceError(Exception):
    """Another worker folded this bucket first."""


class HistoryJob:
    """Folds and prunes the registry's telemetry; ``run_once`` or ``start`` a thread."""

    def __init__(
        self,
        registry: Registry,
        policy: HistoryPolicy | None = None,
        *,
        clock: Callable[[], datetime] = _utcnow,
        interval: float = 30.0,
        lock: LeaderLock | None = None,
    ) -> None:
        """Work on ``registry`` with ``policy``; ``lock`` (if any) gates each tick."""
        self._registry = registry
        self._policy = policy or HistoryPolicy()
        self._clock = clock
        self._job = PeriodicJob(
            "history", self.run_once, interval=interval, lock=lock, what="history run", logger=log
        )

    # ----------------------------------------------------------------- one run
    def run_once(self) -> RunReport:
        """Fold every closed bucket (up to the per-run caps), then apply retention.

        Raises:
            RegistryUnavailableError: the database failed (what was committed stays).
        """
        now = self._clock()
        out = RunReport()
        closed = floor_to(now - timedelta(seconds=self._policy.grace_seconds), FINE)
        while out.fine_buckets < self._policy.max_buckets_per_run:
            if not self._fold_next_fine(closed):
                break
            out.fine_buckets += 1
        fine_done = self.folded_until(FINE)
        while fine_done is not None and out.hour_buckets < self._policy.max_buckets_per_run:
            if not self._fold_next_hour(floor_to(fine_done, HOUR)):
                break
            out.hour_buckets += 1
        self._retention(now, out)
        # After retention: rows that landed in PostgreSQL's default partition and are already
        # past the cut were deleted above, not moved into a new partition.
        out.partitions_created = retention.ensure_partitions(
            self._registry, now, self._policy.partitions_ahead_days
        )
        return out

    def folded_until(self, level: int) -> datetime | None:
        """Every bucket of ``level`` before this time is final (None: nothing folded yet).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        with self._registry.read_session("reading the rollup state") as s:
            return s.scalar(select(RollupState.folded_until).where(RollupState.level == level))

    # ----------------------------------------------------------------- fine buckets
    def _fold_next_fine(self, closed: datetime) -> bool:
        start = self._start(FINE, closed)
        if start is None or start >= closed:
            return False
        end = start + timedelta(seconds=FINE)
        with self._registry.read_session("reading a telemetry bucket") as s:
            first = s.scalar(
                select(func.min(TelemetryRow.received_at)).where(
                    TelemetryRow.received_at >= start, TelemetryRow.received_at < closed
                )
            )
            if first is None:  # nothing until ``closed``: jump there in one step
                return self._commit(FINE, start, closed, [])
            if first >= end:  # skip empty buckets
                return self._commit(FINE, start, floor_to(first, FINE), [])
            rows = [
                RawRow(*r)
                for r in s.execute(
                    select(
                        TelemetryRow.device_id,
                        TelemetryRow.seq,
                        TelemetryRow.kind,
                        TelemetryRow.received_at,
                        TelemetryRow.payload,
                    ).where(TelemetryRow.received_at >= start, TelemetryRow.received_at < end)
                )
            ]
            ids = sorted({r.device_id for r in rows})
            previous = last_reports(s, ids, start)
            stmt = select(Device.id, Device.group).where(Device.id.in_(ids))
            groups = {str(r[0]): str(r[1]) for r in s.execute(stmt).all()}
        cells = fold_rows(rows, previous, groups)
        return self._commit(FINE, start, end, list(cells.items()))

    # ----------------------------------------------------------------- hours
    def _fold_next_hour(self, limit: datetime) -> bool:
        start = self._start(HOUR, limit)
        if start is None or start >= limit:
            return False
        end = start + timedelta(seconds=HOUR)
        with self._registry.read_session("reading fine rollups") as s:
            rows = list(
                s.scalars(
                    select(TelemetryRollup).where(
                        TelemetryRollup.bucket_seconds == FINE,
                        TelemetryRollup.bucket_start >= start,
                        TelemetryRollup.bucket_start < end,
                    )
                )
            )
        parts = [
            (
                (r.device_id, r.model, r.version),
                RollupCell.from_docs(r.device_group, r.max_psi, r.metrics, r.drift, r.drift_arrays),
            )
            for r in sorted(rows, key=lambda r: r.bucket_start)
        ]
        return self._commit(HOUR, start, end, list(merge_cells(parts).items()))

    # ----------------------------------------------------------------- state
    def _start(self, level: int, limit: datetime) -> datetime | None:
        """Where ``level`` resumes; the first run starts at the oldest raw row's bucket."""
        done = self.folded_until(level)
        if done is not None:
            return done
        with self._registry.read_session("finding the oldest telemetry") as s:
            oldest = s.scalar(select(func.min(TelemetryRow.received_at)))
        first = floor_to(oldest if oldest is not None else limit, level)
        with self._registry.write_session("starting the rollup state") as s:
            if s.get(RollupState, level) is None:
                s.add(RollupState(level=level, folded_until=first))
        return self.folded_until(level)

    def _commit(
        self,
        level: int,
        start: datetime,
        end: datetime,
        cells: Sequence[tuple[CellKey, RollupCell]],
    ) -> bool:
        """Compare-and-set the state from ``start`` to ``end`` and store the bucket's cells."""
        try:
            with self._registry.write_session("storing rollups") as s:
                moved = s.execute(
                    update(RollupState)
                    .where(RollupState.level == level, RollupState.folded_until == start)
                    .values(folded_until=end)
                )
                if moved.rowcount != 1:  # type: ignore[attr-defined]
                    raise _LostRaceError
                _replace(s.connection(), level, start, cells)
        except _LostRaceError:
            log.info("rollup level %d at %s was folded by another worker", level, start)
        return True

    # ----------------------------------------------------------------- retention
    def _retention(self, now: datetime, out: RunReport) -> None:
        p = self._policy
        fine_done = self.folded_until(FINE) or _EPOCH
        hour_done = self.folded_until(HOUR) or _EPOCH
        raw_cut = min(now - timedelta(seconds=p.raw_retention_seconds), fine_done)
        fine_cut = min(now - timedelta(seconds=p.fine_retention_seconds), hour_done)
        hour_cut = now - timedelta(seconds=p.hour_retention_seconds)
        out.partitions_dropped = retention.drop_partitions(self._registry, raw_cut)
        budget = p.max_delete_batches_per_run
        while budget > 0:
            budget -= 1
            n = retention.delete_raw_batch(self._registry, raw_cut, p.delete_batch)
            out.raw_deleted += n
            if n < p.delete_batch:
                break
        while budget > 0:
            budget -= 1
            n = retention.prune_keys_batch(self._registry, raw_cut, p.delete_batch)
            out.keys_pruned += n
            if n < p.delete_batch:
                break
        for level, cut in ((FINE, fine_cut), (HOUR, hour_cut)):
            while budget > 0:
                budget -= 1
                n = self._delete_oldest_bucket(level, cut)
                out.rollups_deleted += n
                if n == 0:
                    break

    def _delete_oldest_bucket(self, level: int, cut: datetime) -> int:
        with self._registry.write_session("deleting old rollups") as s:
            oldest = s.scalar(
                select(func.min(TelemetryRollup.bucket_start)).where(
                    TelemetryRollup.bucket_seconds == level
                )
            )
            if oldest is None or oldest >= cut:
                return 0
            res = s.execute(
                delete(TelemetryRollup).where(
                    TelemetryRollup.bucket_seconds == level,
                    TelemetryRollup.bucket_start == oldest,
                )
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Run ``run_once`` every ``interval`` seconds in a daemon thread, holding the lock."""
        self._job.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current run and release the lock."""
        self._job.close(timeout)


def _replace(
    conn: Connection,
    level: int,
    start: datetime,
    cells: Sequence[tuple[CellKey, RollupCell]],
) -> None:
    conn.execute(
        delete(TelemetryRollup).where(
            TelemetryRollup.bucket_seconds == level, TelemetryRollup.bucket_start == start
        )
    )
    if not cells:
        return
    conn.execute(
        insert(TelemetryRollup),
        [
            {
                "bucket_seconds": level,
                "bucket_start": start,
                "device_id": key[0],
                "model": key[1],
                "version": key[2],
                "device_group": c.group,
                "reports": c.metrics.reports,
                "requests": c.metrics.requests,
                "max_psi": c.metrics.max_psi,
                "metrics": c.metrics_doc(),
                "drift": c.drift_doc(),
                "drift_arrays": c.drift_blob(),
            }
            for key, c in cells
        ],
    )
