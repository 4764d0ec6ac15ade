"""Reading telemetry history for a time range: rollups where folded, raw rows after that.

Owns: ``plan_range`` (which part of ``[since, until)`` comes from hour rollups, fine rollups
and raw rows), ``drift_inputs`` (what fleet drift merges for a range) and ``last_reports``
(each device's last report
before a time: an index seek on ``(device_id, received_at)``). Every statement carries the time
range in SQL; nothing here reads a device's whole history. Does not own: folding (``job``,
``cells``), scoring (``fleet_drift``, ``rollouts.observation``).

Resolution: rollups are bucketed by server receive time, so a range is served exactly at
bucket boundaries: ``since`` is rounded down to the fine bucket (5 minutes; to the hour for
ranges longer than 6 hours, so a day costs 24 rows per device, not 35); ``until`` is exact
(the partial bucket before it is read from raw rows). Raw rows are read only after the fine
level's ``folded_until`` or the last whole bucket before ``until`` (at most the current partial
bucket plus the grace), and for a rollout the first partial bucket of each device's window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import DateTime, Text, cast, select, type_coerce
from sqlalchemy.orm import Session

from edge_agent.errors import ContractError
from fleet_server.history.cells import (
    DriftPart,
    check_layout_length,
    drift_layout,
    int_code_of,
)
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import (
    Device,
    RollupState,
    TelemetryRollup,
    TelemetryRow,
)

__all__ = [
    "FINE_S",
    "HOUR_S",
    "DriftInputs",
    "PartKey",
    "RangePlan",
    "ceil_time",
    "drift_inputs",
    "floor_time",
    "folded_marks",
    "last_reports",
    "plan_range",
]

FINE_S = 300
HOUR_S = 3600
#: Ranges longer than this start on the hour (one rollup row per device and hour).
LONG_RANGE = timedelta(hours=6)
_CHUNK = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Span = tuple[datetime, datetime]


def floor_time(t: datetime, seconds: int) -> datetime:
    """``t`` rounded down to a multiple of ``seconds`` since the Unix epoch."""
    return _EPOCH + timedelta(seconds=int((t - _EPOCH).total_seconds() // seconds) * seconds)


def ceil_time(t: datetime, seconds: int) -> datetime:
    """``t`` rounded up to a multiple of ``seconds`` since the Unix epoch."""
    f = floor_time(t, seconds)
    return f if f == t else f + timedelta(seconds=seconds)


@dataclass(frozen=True)
class RangePlan:
    """Where each part of a range is read from (half-open spans)."""

    hours: Span | None
    fine: tuple[Span, ...]
    raw: Span | None


def plan_range(
    since: datetime, until: datetime, fine_done: datetime | None, hour_done: datetime | None
) -> RangePlan:
    """Split ``[since, until)`` over the levels folded so far (see the module docstring).

    When nothing of the range is folded, it is all raw rows from the exact ``since``.
    """
    exact = since
    since = floor_time(since, HOUR_S if until - since > LONG_RANGE else FINE_S)
    folded_end = min(floor_time(until, FINE_S), fine_done or since)
    if folded_end <= exact:
        return RangePlan(None, (), (exact, until) if exact < until else None)
    hour_done = hour_done or since
    hours: Span | None = None
    h_lo, h_hi = ceil_time(since, HOUR_S), min(floor_time(folded_end, HOUR_S), hour_done)
    if h_lo < h_hi:
        hours = (h_lo, h_hi)
    fine: list[Span] = []
    if hours is None:
        if since < folded_end:
            fine.append((since, folded_end))
    else:
        if since < hours[0]:
            fine.append((since, hours[0]))
        if hours[1] < folded_end:
            fine.append((hours[1], folded_end))
    raw = (folded_end, until) if folded_end < until else None
    return RangePlan(hours, tuple(fine), raw)


def folded_marks(s: Session) -> tuple[datetime | None, datetime | None]:
    """``folded_until`` of the fine and hour levels (None: not started)."""
    rows = s.execute(select(RollupState.level, RollupState.folded_until)).all()
    marks = {int(r[0]): r[1] for r in rows}
    return marks.get(FINE_S), marks.get(HOUR_S)


def last_reports(
    s: Session, device_ids: Sequence[str], before: datetime
) -> dict[str, Mapping[str, Any]]:
    """Per device, the payload of its last report received before ``before`` (if any).

    One statement per ``_CHUNK`` devices: their ``devices`` rows (every telemetry row has one:
    a foreign key), each with a correlated ``ORDER BY received_at DESC LIMIT 1`` on the
    ``(device_id, received_at)`` index, so it touches one row per device, not its history, in
    one round trip (not one per device).
    """
    out: dict[str, Mapping[str, Any]] = {}
    inner = TelemetryRow.__table__.alias("prior")
    for i in range(0, len(device_ids), _CHUNK):
        chunk = list(device_ids[i : i + _CHUNK])
        last = (
            select(inner.c.id)
            .where(
                inner.c.device_id == Device.id,
                inner.c.received_at < before,
                inner.c.kind == "report",
            )
            .order_by(inner.c.received_at.desc(), inner.c.id.desc())
            .limit(1)
            .correlate(Device)
            .scalar_subquery()
        )
        found = s.scalars(select(last).where(Device.id.in_(chunk)))
        ids = [int(x) for x in found if x is not None]
        if ids:
            stmt = select(TelemetryRow.device_id, TelemetryRow.payload).where(
                TelemetryRow.id.in_(ids)
            )
            out.update({str(d): p for d, p in s.execute(stmt)})
    return out


# --------------------------------------------------------------------------- drift
#: (device, version, query bucket start or None) -> its summed parts per (tensor, role)
PartKey = tuple[str, int, str, str, float | None]


@dataclass
class DriftInputs:
    """A range's rollup drift, summed per device, version, tensor, role and query bucket,
    what the rollups skipped, and the raw report rows after the folded part."""

    parts: dict[PartKey, tuple[float, DriftPart]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    raw: list[tuple[str, datetime, Mapping[str, Any]]] = field(default_factory=list)
    plan: RangePlan | None = None


def drift_inputs(
    registry: Registry,
    model: str,
    version: int | None,
    since: datetime,
    until: datetime,
    bucket_seconds: float | None = None,
) -> DriftInputs:
    """What fleet drift merges for ``model`` (optionally one version) in ``[since, until)``.

    Raises:
        RegistryUnavailableError: the database failed.
        ContractError: a stored rollup does not decode.
    """
    out = DriftInputs()
    acc = _PartSums(bucket_seconds)
    with registry.read_session("reading telemetry history") as s:
        fine_done, hour_done = folded_marks(s)
        plan = plan_range(since, until, fine_done, hour_done)
        out.plan = plan
        spans = [(HOUR_S, plan.hours)] if plan.hours else []
        spans += [(FINE_S, span) for span in plan.fine]
        for level, (lo, hi) in spans:
            stmt = select(
                TelemetryRollup.device_id,
                TelemetryRollup.version,
                # Plain DateTime: UTC by construction, without the per-row UTCDateTime hook.
                type_coerce(TelemetryRollup.bucket_start, DateTime(timezone=True)),
                # The JSON text as stored: rows of one fleet repeat a few documents, so they
                # are parsed once each (``_PartSums.add``), not once per row.
                cast(TelemetryRollup.drift, Text),
                TelemetryRollup.drift_arrays,
            ).where(
                TelemetryRollup.bucket_seconds == level,
                TelemetryRollup.bucket_start >= lo,
                TelemetryRollup.bucket_start < hi,
                TelemetryRollup.model == model,
            )
            if version is not None:
                stmt = stmt.where(TelemetryRollup.version == version)
            for dev, ver, at, drift, blob in _rows(s, stmt):
                stamp = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
                acc.add(str(dev), int(ver), stamp, drift, bytes(blob))
        if plan.raw is not None:
            stmt2 = select(
                TelemetryRow.device_id, TelemetryRow.received_at, TelemetryRow.payload
            ).where(
                TelemetryRow.received_at >= plan.raw[0],
                TelemetryRow.received_at < plan.raw[1],
                TelemetryRow.kind == "report",
            )
            out.raw = [(str(d), t, p) for d, t, p in s.execute(stmt2)]
    out.parts, out.skipped = acc.result()
    return out


def _rows(s: Session, stmt: Any) -> Iterator[Any]:
    """The statement's rows; on PostgreSQL in the binary protocol (``bytea`` in text format is
    hex: twice the bytes on the wire and a decode of every byte)."""
    conn = s.connection()
    if conn.dialect.name != "postgresql":
        yield from conn.execute(stmt)
        return
    compiled = stmt.compile(dialect=conn.dialect)
    raw: Any = conn.connection.dbapi_connection
    with raw.cursor(binary=True) as cur:
        cur.execute(str(compiled), compiled.params)
        yield from cur


_PartClass = tuple[str, str, str, int, int]
#: A parsed drift document: its skipped counts, its parts (tensor, role, class, windows,
#: integer code, offset, length) and the arrays' total length.
_DocLayout = tuple[
    list[tuple[str, int]], list[tuple[str, str, _PartClass, int, str, int, int]], int
]


class _PartSums:
    """Sums stored drift parts per key with one numpy reduction per (tensor, role, edges) and
    stored integer width.

    Integers add exactly in any grouping; the float ``sum``/``sumsq`` are added row by row in
    the rows' order within each key, whatever width each row's integers were stored in, so
    the totals do not depend on it.
    """

    def __init__(self, bucket_seconds: float | None) -> None:
        self._size = bucket_seconds
        self._keys: dict[tuple[str, str, str, int, int], dict[PartKey, int]] = {}
        self._rows: dict[tuple[str, str, str, int, int], list[tuple[int, int, str, memoryview]]]
        self._rows = {}
        self._first: dict[PartKey, float] = {}
        self._docs: dict[str, _DocLayout] = {}
        self.skipped: dict[str, int] = {}

    def add(self, dev: str, ver: int, at: float, doc: str, blob: bytes) -> None:
        layout = self._docs.get(doc)
        if layout is None:
            layout = self._docs[doc] = self._layout(doc)
        skipped, parts, total = layout
        for k, n in skipped:
            self.skipped[k] = self.skipped.get(k, 0) + n
        check_layout_length(total, blob)
        qb = None if self._size is None else math.floor(at / self._size) * self._size
        view = memoryview(blob)
        for tensor, role, cls, windows, code, offset, size in parts:
            key = (dev, ver, tensor, role, qb)
            keys = self._keys.setdefault(cls, {})
            index = keys.setdefault(key, len(keys))
            self._first.setdefault(key, at)
            self._rows.setdefault(cls, []).append(
                (index, windows, code, view[offset : offset + size])
            )

    @staticmethod
    def _layout(doc: str) -> _DocLayout:
        """A stored drift document, parsed and laid out once: rows of one fleet repeat a few."""
        try:
            drift = json.loads(doc)
        except ValueError as exc:
            raise ContractError(f"stored rollup drift document is not JSON: {exc}") from exc
        if not isinstance(drift, dict):
            raise ContractError("stored rollup drift document is not an object")
        skipped = [(str(k), int(n)) for k, n in (drift.get("skipped") or {}).items()]
        entries, total = drift_layout(drift)
        parts = []
        for tensor, role, part, offset, size in entries:
            f, width = (int(x) for x in part["shape"])
            cls = (tensor, role, str(part["edges"]), f, width)
            parts.append((tensor, role, cls, int(part["windows"]), int_code_of(part), offset, size))
        return skipped, parts, total

    def result(self) -> tuple[dict[PartKey, tuple[float, DriftPart]], dict[str, int]]:
        out: dict[PartKey, tuple[float, DriftPart]] = {}
        for cls, rows in self._rows.items():
            _t, _r, digest, f, width = cls
            n_int = f * width + 2 * f
            order = sorted(range(len(rows)), key=lambda i: rows[i][0])
            index = np.fromiter((rows[i][0] for i in order), np.int64, len(order))
            windows = np.fromiter((rows[i][1] for i in order), np.int64, len(order))
            starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
            # Row r of the sorted rows is summed into key row ``owner[r]``.
            owner = np.cumsum(np.r_[True, index[1:] != index[:-1]]) - 1
            isum = np.zeros((len(starts), n_int), np.int64)
            floats = np.empty((len(order), 2 * f), np.float64)
            by_code: dict[str, list[int]] = {}
            for r, i in enumerate(order):
                by_code.setdefault(rows[i][2], []).append(r)
            for code, members in by_code.items():
                size = np.dtype(code).itemsize
                stride = n_int * size + 2 * f * 8
                blob = b"".join(rows[order[r]][3] for r in members)
                n = len(members)
                ints = np.ndarray((n, n_int), code, blob, 0, (stride, size))
                at = np.array(members, np.int64)
                floats[at] = np.ndarray((n, 2 * f), "<f8", blob, n_int * size, (stride, 8))
                mine = owner[at]
                first = np.flatnonzero(np.r_[True, mine[1:] != mine[:-1]])
                isum[mine[first]] += np.add.reduceat(ints, first, axis=0, dtype=np.int64)
            fsum = np.add.reduceat(floats, starts, axis=0)
            wsum = np.add.reduceat(windows, starts)
            by_index = {i: k for k, i in self._keys[cls].items()}
            for row, start in enumerate(starts):
                key = by_index[int(index[start])]
                part = DriftPart(
                    digest,
                    isum[row, : f * width].reshape(f, width),
                    isum[row, f * width : f * width + f],
                    isum[row, f * width + f :],
                    fsum[row, :f],
                    fsum[row, f:],
                    int(wsum[row]),
                )
                if key in out:  # the same key with other edges: keep the first, count the rest
                    reason = "features" if f != out[key][1].n_features else "edges"
                    name = f"{reason}_mismatch"
                    self.skipped[name] = self.skipped.get(name, 0) + part.windows
                    continue
                out[key] = (self._first[key], part)
        return out, self.skipped
