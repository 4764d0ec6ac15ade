"""Rollup cells: the exact, mergeable totals of one device on one model version in one bucket.

Owns: ``RollupCell`` (counter differences as ``WindowMetrics``, rejects and events by kind,
merged tier-A views per tensor and role), ``fold_rows`` (raw rows of one bucket, plus each
device's last report before it, into cells), ``merge_cells`` (cells of finer buckets into one
coarser cell) and the cells' JSON form for the ``telemetry_rollups`` table. Does not own:
reading or writing the database (``job``, ``queries``), scoring drift (``fleet_drift``).

Pure: values in, values out; no clock, files or database.

Exactness: counters fold by the same rule as a rollout observation
(``rollouts.observation.interval_metrics``: a report counts its difference to the device's previous
report, received in any earlier bucket), so summing the cells of any bucket split of a time
range gives the same totals as observing the raw rows of that range. Tier-A views merge by
integer addition of their arrays (windows with other edges are never merged: counted skipped);
only the float ``sum``/``sumsq`` may differ in the last bits with the order of addition.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift import TierAView
from edge_agent.drift.edges import FeatureEdges
from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from fleet_server.rollouts.metrics import WindowMetrics
from fleet_server.rollouts.observation import interval_metrics, reject_deltas

__all__ = [
    "INT_CODES",
    "WIDE",
    "CellKey",
    "DriftPart",
    "RawRow",
    "RollupCell",
    "check_layout_length",
    "drift_layout",
    "drift_slices",
    "edges_digest",
    "fold_rows",
    "int_code_of",
    "merge_cells",
]

#: (device_id, model, version)
CellKey = tuple[str, str, int]
#: Integer widths of stored drift arrays (numpy codes, little-endian), narrowest first; ``WIDE``
#: (int64) is also what entries without an ``ints`` key hold.
WIDE = "<i8"
INT_CODES = ("<u1", "<u2", "<u4", WIDE)
_INT_MAX = {c: int(np.iinfo(np.dtype(c)).max) for c in INT_CODES}
_COUNTERS = tuple(f.name for f in fields(WindowMetrics) if f.name not in ("max_psi", "confusion"))
_HISTOGRAMS = ("latency_buckets", "latency_fine")


@dataclass(frozen=True)
class RawRow:
    """The fields of a stored telemetry row a fold reads."""

    device_id: str
    seq: int
    kind: str
    received_at: datetime
    payload: Mapping[str, Any]


@dataclass
class DriftPart:
    """Merged tier-A counts of one tensor and role, without their edges.

    Rollups keep only the edges' digest (the edges are the bundle baseline's, which scores
    them; a window with other edges is never merged with it) and the raw arrays in a binary
    column: no base64, JSON or view validation per row, and a query sums many rows' arrays in
    one numpy operation (``queries.drift_inputs``). The integer arrays are stored in the
    narrowest unsigned width that holds every value exactly (``INT_CODES``: an hour of one
    device fits 16 bits, a third of the int64 bytes), named by the entry's ``ints``; entries
    without it (written before) are int64.
    """

    digest: str
    counts: npt.NDArray[np.int64]
    nan: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    sumsq: npt.NDArray[np.float64]
    windows: int = 1

    @classmethod
    def of(cls, view: TierAView, windows: int = 1) -> DriftPart:
        """A part holding ``view`` (its arrays copied)."""
        return cls(
            edges_digest(view.edges),
            view.counts.copy(),
            view.nan.copy(),
            view.count.copy(),
            view.sum.copy(),
            view.sumsq.copy(),
            windows,
        )

    @property
    def n_features(self) -> int:
        """Features of the tensor."""
        return int(self.counts.shape[0])

    def absorb(self, other: DriftPart) -> bool:
        """Add ``other`` into this part; False (nothing added) when its edges differ."""
        if other.digest != self.digest or other.counts.shape != self.counts.shape:
            return False
        self.counts = self.counts + other.counts
        self.nan = self.nan + other.nan
        self.count = self.count + other.count
        self.sum = self.sum + other.sum
        self.sumsq = self.sumsq + other.sumsq
        self.windows += other.windows
        return True

    def view(self, edges: FeatureEdges) -> TierAView:
        """The part as a view with ``edges`` (whose digest must be this part's).

        Raises:
            ContractError: the arrays do not fit ``edges``.
        """
        return TierAView(edges, self.counts, self.nan, self.count, self.sum, self.sumsq)

    def int_code(self) -> str:
        """The narrowest ``INT_CODES`` entry that holds every integer of the part exactly."""
        ints = (self.counts, self.nan, self.count)
        low = min(int(a.min()) for a in ints if a.size)
        high = max(int(a.max()) for a in ints if a.size)
        if low < 0:
            return WIDE
        return next(c for c in INT_CODES if high <= _INT_MAX[c])

    def to_doc(self, tensor: str, role: str) -> dict[str, Any]:
        """The part's entry in the ``drift`` JSON column (its arrays go to ``to_bytes``)."""
        f, width = self.counts.shape
        doc: dict[str, Any] = {
            "tensor": tensor,
            "role": role,
            "windows": self.windows,
            "edges": self.digest,
            "shape": [int(f), int(width)],
        }
        code = self.int_code()
        if code != WIDE:
            doc["ints"] = code
        return doc

    def to_bytes(self) -> bytes:
        """The arrays, little-endian: counts, nan, count (in ``int_code()``'s width), then
        sum, sumsq (float64)."""
        ints = np.concatenate([self.counts.ravel(), self.nan, self.count])
        floats = np.concatenate([self.sum, self.sumsq]).astype("<f8")
        return ints.astype(self.int_code()).tobytes() + floats.tobytes()

    @staticmethod
    def nbytes(f: int, width: int, code: str = WIDE) -> int:
        """Length of ``to_bytes`` for ``f`` features of ``width`` columns, integers in
        ``code``."""
        return (f * width + 2 * f) * np.dtype(code).itemsize + 2 * f * 8

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], data: bytes | memoryview) -> DriftPart:
        """Inverse of ``to_doc`` + ``to_bytes``.

        Raises:
            ContractError: the entry or the bytes are not what ``to_doc``/``to_bytes`` wrote.
        """
        try:
            f, width = (int(x) for x in doc["shape"])
            code = int_code_of(doc)
            if f <= 0 or width <= 0 or len(data) != cls.nbytes(f, width, code):
                raise ValueError(f"{len(data)} bytes for shape {f}x{width} of {code}")
            n = f * width
            ints = np.frombuffer(data, code, count=n + 2 * f).astype(np.int64)
            at = (n + 2 * f) * np.dtype(code).itemsize
            floats = np.frombuffer(data, "<f8", offset=at).astype(np.float64)
            return cls(
                str(doc["edges"]),
                ints[:n].reshape(f, width),
                ints[n : n + f],
                ints[n + f :],
                floats[:f],
                floats[f:],
                int(doc["windows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"stored rollup drift part does not decode: {exc}") from exc


def int_code_of(doc: Mapping[str, Any]) -> str:
    """The integer width of a stored part's arrays (``WIDE`` when its entry names none).

    Raises:
        ContractError: the entry names a width that is not one of ``INT_CODES``.
    """
    code = doc.get("ints", WIDE)
    if not isinstance(code, str) or code not in _INT_MAX:
        raise ContractError(f"stored rollup drift part has unknown integer width {code!r}")
    return str(code)


def edges_digest(edges: FeatureEdges) -> str:
    """A short, stable digest of a tensor's bin edges (equal edges, equal digest)."""
    return _digest_cached(edges)


@functools.lru_cache(maxsize=256)
def _digest_cached(edges: FeatureEdges) -> str:
    text = repr((edges.n_bins, edges.edges)).encode()
    return hashlib.sha256(text).hexdigest()[:24]


@dataclass
class RollupCell:
    """Totals of one (device, model, version) in one bucket (mutable while folding)."""

    group: str
    metrics: WindowMetrics = field(default_factory=WindowMetrics)
    rejects: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    drift: dict[tuple[str, str], DriftPart] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ merging
    def add_drift(self, tensor: str, role: str, part: DriftPart) -> None:
        """Merge a part into this cell's (tensor, role) part; other edges are counted skipped
        (the first edges seen in the bucket win, as a baseline would pick one of them)."""
        mine = self.drift.get((tensor, role))
        if mine is None:
            self.drift[(tensor, role)] = part
            return
        if not mine.absorb(part):
            reason = "features" if part.n_features != mine.n_features else "edges"
            self._skip(f"{reason}_mismatch", part.windows)

    def merge(self, other: RollupCell) -> None:
        """Add ``other`` into this cell (same key; the later group wins)."""
        self.group = other.group
        self.metrics = self.metrics.merge(other.metrics)
        for target, source in ((self.rejects, other.rejects), (self.events, other.events)):
            for k, v in source.items():
                target[k] = target.get(k, 0) + v
        for (tensor, role), part in other.drift.items():
            copy = DriftPart(
                part.digest, part.counts, part.nan, part.count, part.sum, part.sumsq, part.windows
            )
            self.add_drift(tensor, role, copy)
        for k, v in other.skipped.items():
            self._skip(k, v)

    def _skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    # ------------------------------------------------------------------ storage form
    def metrics_doc(self) -> dict[str, Any]:
        """The ``metrics`` JSON column."""
        m = self.metrics
        doc: dict[str, Any] = {k: getattr(m, k) for k in _COUNTERS if k not in _HISTOGRAMS}
        doc["latency_buckets"] = list(m.latency_buckets)
        doc["latency_fine"] = list(m.latency_fine)
        doc["rejects"] = dict(self.rejects)
        doc["events"] = dict(self.events)
        if m.confusion is not None:  # ground truth: only cells that had labels carry it
            doc["confusion"] = m.confusion.to_dict()
        return doc

    def drift_doc(self) -> dict[str, Any]:
        """The ``drift`` JSON column: per part its tensor, role, windows, edges and shape."""
        parts = [p.to_doc(t, r) for (t, r), p in sorted(self.drift.items())]
        return {"parts": parts, "skipped": dict(self.skipped)}

    def drift_blob(self) -> bytes:
        """The ``drift_arrays`` column: the parts' arrays, in ``drift_doc`` order."""
        return b"".join(p.to_bytes() for _k, p in sorted(self.drift.items()))

    @classmethod
    def from_docs(
        cls,
        group: str,
        max_psi: float | None,
        metrics: Mapping[str, Any] | None,
        drift: Mapping[str, Any] | None = None,
        blob: bytes | None = None,
    ) -> RollupCell:
        """Rebuild a cell from its row (``metrics`` or ``drift`` None: leave that part out).

        Raises:
            ContractError: the stored drift parts do not decode (not written by us).
        """
        cell = cls(group)
        if metrics is not None:
            counters = {k: int(metrics.get(k, 0)) for k in _COUNTERS if k not in _HISTOGRAMS}
            # Rollups folded before the fine histogram have none: zeros (judged coarse).
            fine = metrics.get("latency_fine") or WindowMetrics().latency_fine
            cell.metrics = WindowMetrics(
                **counters,
                max_psi=max_psi,
                latency_buckets=tuple(int(x) for x in metrics.get("latency_buckets", ())),
                latency_fine=tuple(int(x) for x in fine),
                confusion=_stored_confusion(metrics.get("confusion")),
            )
            cell.rejects = {str(k): int(v) for k, v in (metrics.get("rejects") or {}).items()}
            cell.events = {str(k): int(v) for k, v in (metrics.get("events") or {}).items()}
        if drift is not None:
            for tensor, role, doc, data in drift_slices(drift, blob or b""):
                cell.drift[(tensor, role)] = DriftPart.from_doc(doc, data)
            cell.skipped = {str(k): int(v) for k, v in (drift.get("skipped") or {}).items()}
        return cell


def _stored_confusion(doc: Any) -> Confusion | None:
    """The ``confusion`` of a stored ``metrics`` column (absent, or not ours: None)."""
    try:
        return None if doc is None else Confusion.from_dict(doc)
    except ContractError:
        return None


def drift_layout(
    drift: Mapping[str, Any],
) -> tuple[list[tuple[str, str, Mapping[str, Any], int, int]], int]:
    """Each stored part's tensor, role, JSON entry, offset and length in the arrays, and the
    arrays' total length: what ``drift_slices`` cuts, computed once per distinct document.

    Raises:
        ContractError: an entry is malformed.
    """
    out, at = [], 0
    for p in drift.get("parts") or ():
        try:
            f, width = (int(x) for x in p["shape"])
            size = DriftPart.nbytes(f, width, int_code_of(p))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContractError(f"stored rollup drift part is malformed: {exc}") from exc
        if f <= 0 or width <= 0:
            raise ContractError("stored rollup drift arrays are shorter than their parts")
        out.append((str(p.get("tensor")), str(p.get("role")), p, at, size))
        at += size
    return out, at


def check_layout_length(total: int, blob: bytes | memoryview) -> None:
    """Refuse arrays whose length is not their entries' (``drift_layout``'s total).

    Raises:
        ContractError: the arrays are shorter or longer than their parts.
    """
    if len(blob) < total:
        raise ContractError("stored rollup drift arrays are shorter than their parts")
    if len(blob) > total:
        raise ContractError("stored rollup drift arrays are longer than their parts")


def drift_slices(
    drift: Mapping[str, Any], blob: bytes
) -> Iterator[tuple[str, str, Mapping[str, Any], memoryview]]:
    """Each stored part's tensor, role, JSON entry and bytes (no arrays are built).

    Raises:
        ContractError: the entries and the bytes do not fit together.
    """
    layout, total = drift_layout(drift)
    check_layout_length(total, blob)
    view = memoryview(blob)
    for tensor, role, p, at, size in layout:
        yield tensor, role, p, view[at : at + size]


# --------------------------------------------------------------------------- folding
def fold_rows(
    rows: Iterable[RawRow],
    previous: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, str],
) -> dict[CellKey, RollupCell]:
    """Fold one bucket's raw rows into cells.

    Args:
        rows: Every stored row received in the bucket (reports and events), any order.
        previous: Per device, the payload of its last report received before the bucket (the
            baseline of its first counter difference); absent devices have none.
        groups: Each device's group (``"(unknown)"`` when missing).

    Returns:
        Cells by (device, model, version); malformed payloads are counted or skipped, never
        raised.
    """
    cells: dict[CellKey, RollupCell] = {}
    by_device: dict[str, list[RawRow]] = {}
    for r in rows:
        by_device.setdefault(r.device_id, []).append(r)

    def cell(device: str, model: str, version: int) -> RollupCell:
        key = (device, model, version)
        found = cells.get(key)
        if found is None:
            found = cells[key] = RollupCell(groups.get(device, "(unknown)"))
        return found

    for device, own in by_device.items():
        prev = previous.get(device)
        for r in sorted(own, key=lambda x: x.seq):
            if r.kind == "event":
                _fold_event(r, cell)
            elif r.kind == "report":
                _fold_report(device, prev, r.payload, cell)
                prev = r.payload
    return cells


def _fold_event(r: RawRow, cell: Any) -> None:
    p = r.payload
    model, version, kind = p.get("model"), p.get("version"), p.get("kind")
    if not isinstance(model, str) or not isinstance(version, int) or isinstance(version, bool):
        return
    target: RollupCell = cell(r.device_id, model, version)
    name = str(kind)[:64]
    target.events[name] = target.events.get(name, 0) + 1


def _fold_report(
    device: str, prev: Mapping[str, Any] | None, payload: Mapping[str, Any], cell: Any
) -> None:
    models = payload.get("models")
    if not isinstance(models, Mapping):
        return
    for model, stats in models.items():
        if not isinstance(stats, Mapping):
            continue
        version = stats.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            continue
        target: RollupCell = cell(device, str(model), version)
        if prev is not None:
            delta = interval_metrics(prev, payload, str(model), version)
            if delta is not None:
                target.metrics = target.metrics.merge(delta)
                for k, v in reject_deltas(prev, payload, str(model)).items():
                    target.rejects[k] = target.rejects.get(k, 0) + v
        _fold_drift(target, stats.get("drift"))


def _fold_drift(target: RollupCell, windows: Any) -> None:
    for w in windows or ():
        try:
            tensor, role = w["tensor"], w["role"]
            if not isinstance(tensor, str) or role not in ("input", "output"):
                raise ContractError("bad tensor or role")
            view = TierAView.from_bytes(base64.b64decode(w["view"], validate=True))
        except (ContractError, KeyError, TypeError, binascii.Error, ValueError):
            target._skip("bad_window")
            continue
        target.add_drift(tensor, role, DriftPart.of(view))


def merge_cells(
    parts: Sequence[tuple[CellKey, RollupCell]],
) -> dict[CellKey, RollupCell]:
    """Merge finer cells into one cell per key (the coarser bucket's)."""
    out: dict[CellKey, RollupCell] = {}
    for key, c in parts:
        found = out.get(key)
        if found is None:
            out[key] = RollupCell(c.group)
            found = out[key]
        found.merge(c)
    return out
