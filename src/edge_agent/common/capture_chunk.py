"""Captured records travelling to the server: the chunk format, on both sides.

Owns: ``CaptureRecord`` (one captured request as the device packs it), ``drop_fields`` (the field
drops, applied on the device before a record leaves it), ``pack_chunk`` and ``parse_chunk``
(the chunk format, both sides). Bytes and values in, values out or ``ContractError``; in
memory (``zipfile`` over ``io.BytesIO``), no sockets, files or clocks. The upload settings
(``capture-config``'s arguments) are ``edge_agent.trust.capture_settings.UploadSettings``.

Does not own the ring buffer (``edge_agent.serving.capture``), what is offered when
(``edge_agent.sync.ops.capture_upload``), the block transfer (``edge_agent.wire.transfer``, the
support-bundle path) or the server's datasets (``fleet_server.capture``).

Chunk format: an uncompressed ``.npz`` (a zip of ``.npy`` arrays, members stored, fixed member
order and timestamps so the same records always give the same bytes), ``n`` records, ``R``
request rows in all::

    meta.npy        uint8, UTF-8 JSON: {"format": "edgefleet-capture", "schema_version": 1,
                    "device_id", "model", "records": n, "rows": R, "inputs": [names],
                    "outputs": [names], "dropped": [field drops applied],
                    "counts": {reason: n}}   (records the device left out, by reason)
    version.npy     int64 (n,)     the model version that answered
    time.npy        float64 (n,)   UNIX seconds of the answer
    request_id.npy  unicode (n,)   the request id ("" when unknown or dropped)
    rows.npy        int64 (n+1,)   record i is rows rows[i]:rows[i+1] of every tensor
    label.npy       int32 (R,)     the class index the application gave as feedback, -1: none
    in<k>.npy       input k of meta.inputs, the records' rows concatenated on axis 0
    out<k>.npy      output k of meta.outputs, likewise

A chunk is hostile input to the server: ``parse_chunk`` reads it from bytes, never unpickles,
accepts only stored members with the expected names, checks each array header against the
member size before reading it, then checks every count and shape against ``meta``.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent import strict_json
from edge_agent.errors import ContractError
from edge_agent.ids import DEVICE_ID_PATTERN, NAME_PATTERN
from edge_agent.trust.capture_settings import DROP_PATTERN, MAX_CHUNK_BYTES, MAX_DROPS

__all__ = [
    "CHUNK_FORMAT",
    "MAX_CHUNK_RECORDS",
    "MAX_TENSORS",
    "SCHEMA_VERSION",
    "CaptureChunk",
    "CaptureRecord",
    "drop_fields",
    "pack_chunk",
    "parse_chunk",
    "write_chunk",
]

CHUNK_FORMAT: Final = "edgefleet-capture"
SCHEMA_VERSION: Final = 1
MAX_CHUNK_RECORDS: Final = 100_000
MAX_TENSORS: Final = 16
MAX_REQUEST_ID: Final = 256
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_FIXED_MEMBERS: Final = ("meta", "version", "time", "request_id", "rows", "label")
_COUNT_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ZIP_DATE: Final = (1980, 1, 1, 0, 0, 0)
_ZIP_ERRORS: Final = (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError)
_ALLOWED_KINDS: Final = frozenset("biuf")


@dataclass(frozen=True)
class CaptureRecord:
    """One captured request: tensors keep their request rows on axis 0; ``labels`` has one
    class index per row (-1: no feedback)."""

    model: str
    version: int
    time: float
    request_id: str
    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: Mapping[str, npt.NDArray[Any]]
    labels: npt.NDArray[np.int32]

    @property
    def rows(self) -> int:
        """Request rows (the labels' length)."""
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class CaptureChunk:
    """A parsed chunk (``records`` and ``counts`` as the device packed them)."""

    device_id: str
    model: str
    versions: npt.NDArray[np.int64]
    times: npt.NDArray[np.float64]
    request_ids: npt.NDArray[np.str_]
    rows: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int32]
    inputs: dict[str, npt.NDArray[Any]]
    outputs: dict[str, npt.NDArray[Any]]
    dropped: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def records(self) -> int:
        """Records in the chunk."""
        return int(self.versions.shape[0])


def drop_fields(record: CaptureRecord, drop: Sequence[str]) -> CaptureRecord:
    """``record`` without the fields ``drop`` names (see ``DROP_PATTERN``); unknown tensor
    names and feature indices beyond a tensor's width drop nothing."""
    if not drop:
        return record
    wanted = set(drop)
    features = sorted({int(d[8:]) for d in wanted if d.startswith("feature:")})
    inputs: dict[str, npt.NDArray[Any]] = {}
    if "inputs" not in wanted:
        for name, tensor in record.inputs.items():
            if f"input:{name}" in wanted:
                continue
            cut = [k for k in features if tensor.ndim >= 2 and k < tensor.shape[-1]]
            inputs[name] = np.delete(tensor, cut, axis=-1) if cut else tensor
    outputs = {} if "outputs" in wanted else dict(record.outputs)
    for name in list(outputs):
        if f"output:{name}" in wanted:
            del outputs[name]
    labels = np.full_like(record.labels, -1) if "labels" in wanted else record.labels
    meta = "metadata" in wanted
    return CaptureRecord(
        record.model,
        record.version,
        math.floor(record.time / 3600) * 3600.0 if meta else record.time,
        "" if meta else record.request_id,
        inputs,
        outputs,
        labels,
    )


def _npy(a: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _members(chunk: CaptureChunk) -> list[tuple[str, npt.NDArray[Any]]]:
    meta = {
        "format": CHUNK_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "device_id": chunk.device_id,
        "model": chunk.model,
        "records": chunk.records,
        "rows": int(chunk.rows[-1]),
        "inputs": list(chunk.inputs),
        "outputs": list(chunk.outputs),
        "dropped": list(chunk.dropped),
        "counts": dict(sorted(chunk.counts.items())),
    }
    out: list[tuple[str, npt.NDArray[Any]]] = [
        ("meta", np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)),
        ("version", chunk.versions),
        ("time", chunk.times),
        ("request_id", chunk.request_ids),
        ("rows", chunk.rows),
        ("label", chunk.labels),
    ]
    out += [(f"in{k}", a) for k, a in enumerate(chunk.inputs.values())]
    out += [(f"out{k}", a) for k, a in enumerate(chunk.outputs.values())]
    return out


def write_chunk(chunk: CaptureChunk) -> bytes:
    """The chunk's bytes (deterministic: the same chunk always gives the same bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, a in _members(chunk):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            z.writestr(info, _npy(a))
    return buf.getvalue()


def _stack(
    records: Sequence[CaptureRecord], key: str
) -> tuple[dict[str, npt.NDArray[Any]], list[bool]]:
    """Tensors present in the first record, concatenated; which records fit (same names,
    trailing shapes and dtypes, rows on axis 0)."""
    first: Mapping[str, npt.NDArray[Any]] = getattr(records[0], key)
    ok = []
    for r in records:
        tensors: Mapping[str, npt.NDArray[Any]] = getattr(r, key)
        ok.append(
            set(tensors) == set(first)
            and all(
                t.ndim >= 1
                and t.shape[0] == r.rows
                and t.shape[1:] == first[n].shape[1:]
                and t.dtype == first[n].dtype
                for n, t in tensors.items()
            )
        )
    stacked = {
        n: np.concatenate([getattr(r, key)[n] for r, fit in zip(records, ok, strict=True) if fit])
        for n in first
    }
    return stacked, ok


def pack_chunk(
    device_id: str,
    model: str,
    records: Sequence[CaptureRecord],
    *,
    dropped: Sequence[str] = (),
    counts: Mapping[str, int] | None = None,
) -> tuple[bytes, int]:
    """Pack ``records`` (field drops already applied) into a chunk.

    Records whose tensors differ from the first record's (names, dtypes, trailing shapes) are
    left out and counted as ``shape_mismatch``.

    Returns:
        The chunk's bytes and how many records it holds.

    Raises:
        ContractError: no record, more than ``MAX_CHUNK_RECORDS`` or ``MAX_TENSORS``, or a
            tensor name the format cannot carry.
    """
    if not records or len(records) > MAX_CHUNK_RECORDS:
        raise ContractError(f"a chunk holds 1..{MAX_CHUNK_RECORDS} records")
    first = records[0]
    for name in (*first.inputs, *first.outputs):
        if not _TENSOR_NAME.fullmatch(name):
            raise ContractError(f"tensor name {name[:80]!r} cannot travel in a chunk")
    if len(first.inputs) > MAX_TENSORS or len(first.outputs) > MAX_TENSORS:
        raise ContractError(f"a chunk carries at most {MAX_TENSORS} inputs and outputs")
    ins, ok_in = _stack(records, "inputs")
    outs, ok_out = _stack(records, "outputs")
    keep = [r for r, a, b in zip(records, ok_in, ok_out, strict=True) if a and b]
    if len(keep) != len(records):  # re-stack the survivors
        ins, _ = _stack(keep, "inputs")
        outs, _ = _stack(keep, "outputs")
    all_counts = dict(counts or {})
    if len(keep) != len(records):
        all_counts["shape_mismatch"] = (
            all_counts.get("shape_mismatch", 0) + len(records) - len(keep)
        )
    chunk = CaptureChunk(
        device_id=device_id,
        model=model,
        versions=np.array([r.version for r in keep], dtype=np.int64),
        times=np.array([r.time for r in keep], dtype=np.float64),
        request_ids=np.array(
            [r.request_id[:MAX_REQUEST_ID] for r in keep], dtype=f"<U{MAX_REQUEST_ID}"
        ),
        rows=np.concatenate([[0], np.cumsum([r.rows for r in keep])]).astype(np.int64),
        labels=np.concatenate([r.labels for r in keep]).astype(np.int32),
        inputs=ins,
        outputs=outs,
        dropped=tuple(dropped),
        counts=all_counts,
    )
    return write_chunk(chunk), len(keep)


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> npt.NDArray[Any]:
    raw = z.read(info)  # stored, and the sizes were checked against the archive's
    with io.BytesIO(raw) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ContractError(f"capture chunk: {info.filename} has .npy version {version}")
        if (dtype.kind not in _ALLOWED_KINDS and dtype.kind != "U") or dtype.hasobject:
            raise ContractError(f"capture chunk: {info.filename} has dtype {dtype.str}")
        if fortran or math.prod(shape) * dtype.itemsize > len(raw):
            raise ContractError(f"capture chunk: {info.filename} header does not fit its size")
        fh.seek(0)
        a = np.lib.format.read_array(fh, allow_pickle=False)
    return np.asarray(a)


def _meta(raw: npt.NDArray[Any]) -> dict[str, Any]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ContractError("capture chunk: meta must be uint8 bytes")
    doc = strict_json.loads(raw.tobytes(), max_bytes=64 * 1024, what="capture chunk meta")
    keys = {
        "format", "schema_version", "device_id", "model", "records", "rows",
        "inputs", "outputs", "dropped", "counts",
    }  # fmt: skip
    if not isinstance(doc, dict) or set(doc) != keys:
        raise ContractError("capture chunk: meta has the wrong fields")
    if doc["format"] != CHUNK_FORMAT or doc["schema_version"] != SCHEMA_VERSION:
        raise ContractError("capture chunk: not an edgefleet-capture chunk of schema 1")
    if not isinstance(doc["device_id"], str) or not DEVICE_ID_PATTERN.fullmatch(doc["device_id"]):
        raise ContractError("capture chunk: bad device_id")
    if not isinstance(doc["model"], str) or not NAME_PATTERN.fullmatch(doc["model"]):
        raise ContractError("capture chunk: bad model")
    for key, cap in (("records", MAX_CHUNK_RECORDS), ("rows", 2**31 - 1)):
        if type(doc[key]) is not int or not 0 <= doc[key] <= cap:
            raise ContractError(f"capture chunk: bad {key}")
    for key in ("inputs", "outputs"):
        names = doc[key]
        if (
            not isinstance(names, list)
            or len(names) > MAX_TENSORS
            or len(set(map(str, names))) != len(names)
            or not all(isinstance(n, str) and _TENSOR_NAME.fullmatch(n) for n in names)
        ):
            raise ContractError(f"capture chunk: bad {key}")
    dropped = doc["dropped"]
    if (
        not isinstance(dropped, list)
        or len(dropped) > MAX_DROPS
        or not all(isinstance(d, str) and DROP_PATTERN.fullmatch(d) for d in dropped)
    ):
        raise ContractError("capture chunk: bad dropped")
    counts = doc["counts"]
    if (
        not isinstance(counts, dict)
        or len(counts) > 32
        or not all(
            _COUNT_KEY.fullmatch(k) and type(v) is int and 0 <= v <= 2**53
            for k, v in counts.items()
        )
    ):
        raise ContractError("capture chunk: bad counts")
    return doc


def parse_chunk(data: bytes, *, max_bytes: int = MAX_CHUNK_BYTES) -> CaptureChunk:
    """Read a chunk strictly (see the module doc).

    Raises:
        ContractError: larger than ``max_bytes``, not a stored zip of the expected members, an
            array of a forbidden dtype or a header that does not fit its member, or counts and
            shapes that disagree with ``meta``.
    """
    if not isinstance(data, bytes | bytearray) or len(data) > max_bytes:
        raise ContractError(f"capture chunk: larger than {max_bytes} bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            infos = z.infolist()
            if len(infos) > len(_FIXED_MEMBERS) + 2 * MAX_TENSORS:
                raise ContractError("capture chunk: too many members")
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise ContractError("capture chunk: duplicate members")
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
                raise ContractError("capture chunk: compressed members are not accepted")
            if sum(i.file_size for i in infos) > len(data):
                raise ContractError("capture chunk: members larger than the archive")
            by_name = {i.filename: i for i in infos}
            if "meta.npy" not in by_name:
                raise ContractError("capture chunk: no meta")
            meta = _meta(_read_member(z, by_name["meta.npy"]))
            expected = [f"{m}.npy" for m in _FIXED_MEMBERS]
            expected += [f"in{k}.npy" for k in range(len(meta["inputs"]))]
            expected += [f"out{k}.npy" for k in range(len(meta["outputs"]))]
            if sorted(names) != sorted(expected):
                raise ContractError("capture chunk: unexpected members")
            arrays = {n[:-4]: _read_member(z, by_name[n]) for n in expected[1:]}
    except ContractError:
        raise
    except _ZIP_ERRORS as exc:
        raise ContractError(f"capture chunk: unreadable: {str(exc)[:200]}") from exc
    return _assemble(meta, arrays)


def _assemble(meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> CaptureChunk:
    n, total = meta["records"], meta["rows"]
    versions, times, rids = arrays["version"], arrays["time"], arrays["request_id"]
    rows, labels = arrays["rows"], arrays["label"]
    checks = (
        (versions.dtype == np.int64 and versions.shape == (n,), "version"),
        (times.dtype == np.float64 and times.shape == (n,), "time"),
        (rids.dtype.kind == "U" and rids.shape == (n,), "request_id"),
        (rows.dtype == np.int64 and rows.shape == (n + 1,), "rows"),
        (labels.dtype == np.int32 and labels.shape == (total,), "label"),
    )
    for ok, what in checks:
        if not ok:
            raise ContractError(f"capture chunk: {what} has the wrong dtype or shape")
    if rids.dtype.itemsize > 4 * MAX_REQUEST_ID:
        raise ContractError("capture chunk: request ids too long")
    if rows[0] != 0 or rows[-1] != total or bool(np.any(np.diff(rows) < 0)):
        raise ContractError("capture chunk: rows are not offsets of the request rows")
    if bool(np.any(labels < -1)) or bool(np.any(labels > 65535)):
        raise ContractError("capture chunk: a label is out of range")
    inputs = {name: arrays[f"in{k}"] for k, name in enumerate(meta["inputs"])}
    outputs = {name: arrays[f"out{k}"] for k, name in enumerate(meta["outputs"])}
    for name, a in (*inputs.items(), *outputs.items()):
        if a.ndim < 1 or a.shape[0] != total or a.dtype.kind not in _ALLOWED_KINDS:
            raise ContractError(f"capture chunk: tensor {name!r} does not have {total} rows")
    return CaptureChunk(
        device_id=meta["device_id"],
        model=meta["model"],
        versions=versions,
        times=times,
        request_ids=rids,
        rows=rows,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        dropped=tuple(meta["dropped"]),
        counts=dict(meta["counts"]),
    )
