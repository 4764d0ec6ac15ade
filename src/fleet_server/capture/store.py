"""Datasets on the server: take a verified chunk, refuse what is bad, store it by digest, export.

Owns: ``DatasetStore``. ``ingest`` parses a chunk a device uploaded (``edge_agent.common.
capture_chunk.parse_chunk``: a malformed or oversized chunk is refused whole), checks it
against the model's policy (the fields the policy drops must be absent: a device that sent them
is refused whole), refuses bad records one by one (a version out of range, a time that is not a
finite time at most a day ahead, an unprintable request id, more than ``MAX_RECORD_ROWS`` rows
or ``MAX_RECORD_BYTES`` of tensors), writes the records it kept back in the chunk format (the
canonical bytes: the same records always give the same digest) as
``<state_dir>/datasets/<sha256>.npz`` and registers it with its provenance (device, model,
versions, time range, counts, labels present). ``export`` writes a dataset as a flat training
``.npz`` or Parquet file (one row per request row); ``evalset_bytes`` turns its labelled rows
into an evaluation set file (``fleet_server.evalsets``).

Does not pull blocks (``fleet_server.diagnostics``) or decide which devices upload
(``fleet_server.capture.service``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent.common.capture_chunk import CaptureChunk, parse_chunk, write_chunk
from edge_agent.common.durable import write_atomic
from edge_agent.errors import ContractError
from edge_agent.trust.capture_settings import MAX_CHUNK_BYTES
from fleet_server.capture.parquet import to_parquet
from fleet_server.errors import CaptureError, DatasetUnusableError
from fleet_server.registry.ops import datasets as rows
from fleet_server.registry.ops.datasets import CapturePolicy, DatasetRecord
from fleet_server.registry.store import Registry

__all__ = [
    "DATASET_SUFFIX",
    "EXPORT_FORMATS",
    "MAX_EXPORT_BYTES",
    "MAX_MERGED_BYTES",
    "MAX_MERGED_DATASETS",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_ROWS",
    "DatasetStore",
    "IngestResult",
]

log = logging.getLogger(__name__)

DATASET_SUFFIX: Final = ".npz"
#: What ``DatasetStore.export`` writes.
EXPORT_FORMATS: Final = ("npz", "parquet")
#: One merged export: at most this many datasets and stored bytes (narrow the time range).
MAX_MERGED_DATASETS: Final = 1000
MAX_MERGED_BYTES: Final = 256 * 1024 * 1024
#: What one export may build in memory (its columns), whatever the stored size.
MAX_EXPORT_BYTES: Final = 512 * 1024 * 1024
MAX_RECORD_ROWS: Final = 4096
MAX_RECORD_BYTES: Final = 1024 * 1024
MAX_FUTURE_SECONDS: Final = 86400.0
_MAX_VERSION: Final = 2**31 - 1
_PRINTABLE_ID = re.compile(r"[\x20-\x7e]{0,256}")


@dataclass(frozen=True)
class IngestResult:
    """What one chunk became: a dataset, or the reason it was refused whole; records refused
    one by one, by reason."""

    device_id: str
    model: str
    chunk_sha256: str
    dataset: DatasetRecord | None
    refused: str = ""
    refused_records: dict[str, int] | None = None


def _violates(chunk: CaptureChunk, drop: tuple[str, ...]) -> bool:
    """Whether the chunk carries a field the policy drops."""
    for d in drop:
        kind, _, name = d.partition(":")
        if (
            (d == "inputs" and chunk.inputs)
            or (d == "outputs" and chunk.outputs)
            or (d == "labels" and bool(np.any(chunk.labels >= 0)))
            or (d == "metadata" and any(chunk.request_ids.tolist()))
            or (kind == "input" and name in chunk.inputs)
            or (kind == "output" and name in chunk.outputs)
        ):
            return True
    return not set(drop) <= set(chunk.dropped)


def _bad_records(chunk: CaptureChunk, now: float) -> tuple[npt.NDArray[np.bool_], Counter[str]]:
    keep = np.ones(chunk.records, dtype=bool)
    reasons: Counter[str] = Counter()
    row_bytes = sum(
        int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
        for a in (*chunk.inputs.values(), *chunk.outputs.values())
    )
    for i in range(chunk.records):
        n_rows = int(chunk.rows[i + 1] - chunk.rows[i])
        t = float(chunk.times[i])
        reason = ""
        if not 1 <= int(chunk.versions[i]) <= _MAX_VERSION:
            reason = "bad_version"
        elif not math.isfinite(t) or t < 0 or t > now + MAX_FUTURE_SECONDS:
            reason = "bad_time"
        elif not _PRINTABLE_ID.fullmatch(str(chunk.request_ids[i])):
            reason = "bad_request_id"
        elif n_rows > MAX_RECORD_ROWS or n_rows * row_bytes > MAX_RECORD_BYTES:
            reason = "oversized"
        if reason:
            keep[i] = False
            reasons[reason] += 1
    return keep, reasons


def _select(chunk: CaptureChunk, keep: npt.NDArray[np.bool_]) -> CaptureChunk:
    row_mask = np.repeat(keep, np.diff(chunk.rows))
    kept_rows = np.diff(chunk.rows)[keep]
    return replace(
        chunk,
        versions=chunk.versions[keep],
        times=chunk.times[keep],
        request_ids=chunk.request_ids[keep],
        rows=np.concatenate([[0], np.cumsum(kept_rows)]).astype(np.int64),
        labels=chunk.labels[row_mask],
        inputs={n: a[row_mask] for n, a in chunk.inputs.items()},
        outputs={n: a[row_mask] for n, a in chunk.outputs.items()},
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


class DatasetStore:
    """Dataset files named ``<sha256>.npz`` in ``directory``, registered in ``registry``."""

    def __init__(
        self,
        directory: Path,
        registry: Registry,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._dir = Path(directory)
        self._registry = registry
        self._clock = clock

    def path_of(self, sha256: str) -> Path:
        """The file a dataset with this digest is (or would be) stored at."""
        return self._dir / f"{sha256}{DATASET_SUFFIX}"

    def ingest(
        self, device_id: str, policy: CapturePolicy, data: bytes, counts: dict[str, int]
    ) -> IngestResult:
        """Take one verified chunk from ``device_id`` for ``policy.model`` (see the module doc).

        Args:
            counts: what the device reported leaving out (its answer's counts).

        Raises:
            CaptureError: the file cannot be written.
            RegistryUnavailableError: the database failed.
        """
        chunk_sha = hashlib.sha256(data).hexdigest()
        now = self._clock()

        def refuse(reason: str) -> IngestResult:
            rows.record_chunk(
                self._registry, policy.model, device_id, ack_sha256=chunk_sha, refused=True,
                device_counts=counts, at=now,
            )  # fmt: skip
            log.warning("capture chunk from %s refused: %s", device_id, reason)
            return IngestResult(device_id, policy.model, chunk_sha, None, reason)

        try:
            chunk = parse_chunk(data, max_bytes=min(policy.chunk_bytes, MAX_CHUNK_BYTES))
        except ContractError as exc:
            return refuse("malformed" if "larger than" not in str(exc) else "oversized")
        if chunk.device_id != device_id or chunk.model != policy.model:
            return refuse("mix_and_match")
        if _violates(chunk, policy.drop):
            return refuse("policy_violation")
        keep, reasons = _bad_records(chunk, now.timestamp())
        clean = _select(chunk, keep) if not keep.all() else chunk
        refused_records = sum(reasons.values())
        if clean.records == 0:
            rows.record_chunk(
                self._registry, policy.model, device_id, ack_sha256=chunk_sha,
                refused_records=refused_records, device_counts=counts, at=now,
            )  # fmt: skip
            return IngestResult(device_id, policy.model, chunk_sha, None, "", dict(reasons))
        canonical = write_chunk(clean)
        sha256 = hashlib.sha256(canonical).hexdigest()
        path = self.path_of(sha256)
        try:
            if not path.is_file():
                self._dir.mkdir(parents=True, exist_ok=True)
                write_atomic(path, canonical)
        except OSError as exc:
            raise CaptureError(f"cannot store dataset {sha256}: {exc.strerror}") from exc
        record = DatasetRecord(
            sha256=sha256,
            model=policy.model,
            length=len(canonical),
            records=clean.records,
            rows=int(clean.rows[-1]),
            labelled_rows=int(np.count_nonzero(clean.labels >= 0)),
            time_from=float(clean.times.min()),
            time_to=float(clean.times.max()),
            created_at=now,
            provenance={
                "devices": [device_id],
                "versions": sorted({int(v) for v in clean.versions}),
                "inputs": {n: _describe(a) for n, a in clean.inputs.items()},
                "outputs": {n: _describe(a) for n, a in clean.outputs.items()},
                "dropped": list(clean.dropped),
                "refused_records": dict(reasons),
                "device_counts": dict(chunk.counts),
                "labelled_records": int(
                    sum(
                        bool(np.any(clean.labels[clean.rows[i] : clean.rows[i + 1]] >= 0))
                        for i in range(clean.records)
                    )
                ),
                "chunk_sha256": chunk_sha,
            },
        )
        stored, _ = rows.add_dataset(self._registry, record)
        rows.record_chunk(
            self._registry, policy.model, device_id, ack_sha256=chunk_sha,
            records=clean.records, refused_records=refused_records, device_counts=counts, at=now,
        )  # fmt: skip
        return IngestResult(device_id, policy.model, chunk_sha, stored, "", dict(reasons))

    def load(self, sha256: str) -> CaptureChunk:
        """A stored dataset's records.

        Raises:
            UnknownDatasetError: not registered.
            CaptureError: registered but its file is missing or damaged.
        """
        rows.get_dataset(self._registry, sha256)
        try:
            data = self.path_of(sha256).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise CaptureError(f"dataset {sha256} does not match its digest")
            return parse_chunk(data, max_bytes=len(data))
        except (OSError, ContractError) as exc:
            raise CaptureError(f"dataset {sha256} unreadable: {exc}") from exc

    def export(self, sha256: str, fmt: str = "npz") -> bytes:
        """A flat training file: one row per request row (``input/<name>``,
        ``output/<name>``, ``label`` (-1: none), ``version``, ``time``, ``record``,
        ``request_id``, ``device``), as ``.npz`` or Parquet (``fmt`` one of ``EXPORT_FORMATS``;
        the same columns, ``fleet_server.capture.parquet``).

        Raises:
            UnknownDatasetError, CaptureError: as ``load``.
            DatasetUnusableError: an unknown format, columns Parquet cannot hold, or columns
                over ``MAX_EXPORT_BYTES``.
        """
        return _encode(self._columns(sha256), fmt, f"dataset {sha256[:12]}")

    def export_model(self, model: str, since: float, until: float, fmt: str = "npz") -> bytes:
        """One training file of every request row of ``model`` captured between ``since`` and
        ``until`` (Unix seconds, both included), over all its datasets in that range: the
        columns of ``export``, rows in time order (``record`` counts within its dataset).

        Raises:
            DatasetUnusableError: an unknown format; no row in the range; more than
                ``MAX_MERGED_DATASETS`` datasets or ``MAX_MERGED_BYTES`` in it, or columns
                over ``MAX_EXPORT_BYTES``; datasets whose
                columns differ (another contract: export them one by one).
            CaptureError: a dataset's file is missing or damaged.
        """
        if fmt not in EXPORT_FORMATS:
            raise DatasetUnusableError(f"export format must be one of {', '.join(EXPORT_FORMATS)}")
        records = rows.datasets_in_range(
            self._registry, model, since, until, MAX_MERGED_DATASETS + 1
        )
        if len(records) > MAX_MERGED_DATASETS:
            raise DatasetUnusableError(
                f"more than {MAX_MERGED_DATASETS} datasets of {model!r} in the range: narrow it"
            )
        if sum(r.length for r in records) > MAX_MERGED_BYTES:
            raise DatasetUnusableError(
                f"the datasets of {model!r} in the range hold over {MAX_MERGED_BYTES} bytes: "
                "narrow it"
            )
        parts: list[tuple[DatasetRecord, dict[str, Any]]] = []
        left = MAX_EXPORT_BYTES
        for record in records:
            columns = self._columns(record.sha256, left)
            when = columns["time"]
            keep = (when >= since) & (when <= until)
            if keep.any():
                part = {k: a[keep] for k, a in columns.items()}
                left -= sum(int(a.nbytes) for a in part.values())
                parts.append((record, part))
        if not parts:
            raise DatasetUnusableError(f"no captured row of {model!r} in the range")
        first = parts[0][1]
        for record, part in parts[1:]:
            mismatch = _column_mismatch(first, part)
            if mismatch:
                raise DatasetUnusableError(
                    f"dataset {record.sha256[:12]} of {model!r} differs from the first in the "
                    f"range ({mismatch}): export the datasets one by one"
                )
        merged = {k: np.concatenate([part[k] for _, part in parts]) for k in first}
        # Devices' datasets overlap in time: rows in time order (stable within a dataset).
        order = np.argsort(merged["time"], kind="stable")
        merged = {k: a[order] for k, a in merged.items()}
        return _encode(merged, fmt, f"{model!r} from {since:.0f} to {until:.0f}")

    def _columns(self, sha256: str, budget: int | None = None) -> dict[str, Any]:
        """The export's columns of one dataset, refused before they are built when they would
        take more than ``budget`` bytes: per-record values (request id, time, version, device)
        repeat on every row, so a small stored chunk can export large.

        Raises:
            UnknownDatasetError, CaptureError: as ``load``.
            DatasetUnusableError: over ``budget``.
        """
        budget = MAX_EXPORT_BYTES if budget is None else budget
        chunk = self.load(sha256)
        rows = int(chunk.rows[-1])
        longest = max((len(i) for i in chunk.request_ids.tolist()), default=0)
        ids = chunk.request_ids.astype(f"<U{max(1, longest)}")
        tensors = [*chunk.inputs.values(), *chunk.outputs.values(), chunk.labels]
        per_row = 3 * 8 + ids.itemsize + 4 * max(1, len(chunk.device_id))
        size = sum(int(a.nbytes) for a in tensors) + rows * per_row
        if size > budget:
            raise DatasetUnusableError(
                f"dataset {sha256[:12]} exports to {size} bytes, over the {budget} left for "
                "one export: narrow the range"
            )
        per_record = np.diff(chunk.rows)
        arrays: dict[str, Any] = {f"input/{n}": a for n, a in chunk.inputs.items()}
        arrays.update({f"output/{n}": a for n, a in chunk.outputs.items()})
        arrays["label"] = chunk.labels
        arrays["version"] = np.repeat(chunk.versions, per_record)
        arrays["time"] = np.repeat(chunk.times, per_record)
        arrays["record"] = np.repeat(np.arange(chunk.records, dtype=np.int64), per_record)
        arrays["request_id"] = np.repeat(ids, per_record)
        arrays["device"] = np.full(rows, chunk.device_id)
        return arrays

    def evalset_bytes(self, sha256: str, input_name: str | None = None) -> bytes:
        """An evaluation set file (``x`` float32, ``y`` class indices) of the labelled rows.

        Raises:
            DatasetUnusableError: no such input, several inputs and none named, or no labelled
                row.
            UnknownDatasetError, CaptureError: as ``load``.
        """
        chunk = self.load(sha256)
        if input_name is None:
            if len(chunk.inputs) != 1:
                raise DatasetUnusableError(
                    f"dataset {sha256[:12]} has {len(chunk.inputs)} inputs: name one"
                )
            input_name = next(iter(chunk.inputs))
        if input_name not in chunk.inputs:
            raise DatasetUnusableError(f"dataset {sha256[:12]} has no input {input_name[:64]!r}")
        labelled = chunk.labels >= 0
        if not labelled.any():
            raise DatasetUnusableError(f"dataset {sha256[:12]} has no labelled row")
        buf = io.BytesIO()
        np.savez(
            buf,
            x=chunk.inputs[input_name][labelled].astype(np.float32),
            y=chunk.labels[labelled].astype(np.int64),
        )
        return buf.getvalue()


def _encode(arrays: dict[str, Any], fmt: str, what: str) -> bytes:
    if fmt not in EXPORT_FORMATS:
        raise DatasetUnusableError(f"export format must be one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet":
        try:
            return to_parquet(arrays)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise DatasetUnusableError(f"{what} as Parquet: {exc}") from exc
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _column_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Why two datasets' columns cannot be stacked ("" when they can)."""
    if set(a) != set(b):
        return f"columns {sorted(set(a) ^ set(b))[:4]}"
    for name in sorted(a):
        x, y = a[name], b[name]
        # Text columns (device, request id) stack at any width; numbers only at one dtype.
        same = x.dtype.kind == y.dtype.kind if x.dtype.kind in "US" else x.dtype == y.dtype
        if not same or x.shape[1:] != y.shape[1:]:
            return f"{name}: {_describe(x)} vs {_describe(y)}"
    return ""


def _describe(a: npt.NDArray[Any]) -> dict[str, Any]:
    return {"dtype": a.dtype.str, "row_shape": [int(d) for d in a.shape[1:]]}
