"""The capture chunk format and the upload settings: round trips (hypothesis), field drops, and
a hostile-chunk table the server's parser must refuse with ``ContractError``."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.common.capture_chunk import (
    CaptureRecord,
    drop_fields,
    pack_chunk,
    parse_chunk,
)
from edge_agent.errors import CommandArgumentError, ContractError
from edge_agent.trust.capture_settings import UploadSettings
from edge_agent.trust.command import CaptureUploadArgs, parse_arguments


def record(
    rows: int = 2, width: int = 4, rid: str = "r1", labels: list[int] | None = None, t: float = 5.0
) -> CaptureRecord:
    x = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    return CaptureRecord(
        "digits",
        3,
        t,
        rid,
        {"x": x},
        {"probs": np.full((rows, 3), 0.25, dtype=np.float32)},
        np.asarray(labels if labels is not None else [-1] * rows, dtype=np.int32),
    )


records_st = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.text(alphabet="abc123-", max_size=20),
        st.floats(0, 2e9, allow_nan=False),
        st.integers(1, 99),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(records_st)
def test_pack_parse_round_trip(spec: list[tuple[int, str, float, int]]) -> None:
    recs = []
    for rows, rid, t, v in spec:
        r = record(rows=rows, rid=rid, t=t, labels=[i % 3 - 1 for i in range(rows)])
        recs.append(CaptureRecord(r.model, v, t, rid, r.inputs, r.outputs, r.labels))
    data, kept = pack_chunk("cam-7", "digits", recs, counts={"not_sampled": 2})
    assert kept == len(recs)
    assert pack_chunk("cam-7", "digits", recs, counts={"not_sampled": 2})[0] == data  # stable
    chunk = parse_chunk(data)
    assert chunk.records == len(recs)
    assert chunk.counts == {"not_sampled": 2}
    assert chunk.versions.tolist() == [r.version for r in recs]
    assert chunk.request_ids.tolist() == [r.request_id for r in recs]
    assert chunk.rows.tolist()[-1] == sum(r.rows for r in recs)
    np.testing.assert_array_equal(chunk.inputs["x"], np.concatenate([r.inputs["x"] for r in recs]))
    np.testing.assert_array_equal(chunk.labels, np.concatenate([r.labels for r in recs]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    with pytest.raises(ContractError):
        parse_chunk(data)


def test_records_of_another_shape_are_left_out_and_counted() -> None:
    odd = record(width=5)
    data, kept = pack_chunk("cam-7", "digits", [record(), odd, record()])
    assert kept == 2
    assert parse_chunk(data).counts == {"shape_mismatch": 1}


@pytest.mark.parametrize(
    ("drop", "check"),
    [
        (("inputs",), lambda r: r.inputs == {} and "probs" in r.outputs),
        (("outputs",), lambda r: r.outputs == {} and "x" in r.inputs),
        (("input:x",), lambda r: r.inputs == {}),
        (("output:probs",), lambda r: r.outputs == {}),
        (("labels",), lambda r: r.labels.tolist() == [-1, -1]),
        (("metadata",), lambda r: r.request_id == "" and r.time == 0.0),
        (("feature:1", "feature:3"), lambda r: r.inputs["x"].tolist() == [[0, 2], [4, 6]]),
        (("feature:99",), lambda r: r.inputs["x"].shape == (2, 4)),
        (("input:nope",), lambda r: "x" in r.inputs),
    ],
)
def test_field_drops(drop: tuple[str, ...], check: Any) -> None:
    dropped = drop_fields(record(labels=[1, 0]), drop)
    assert check(dropped)
    data, _ = pack_chunk("cam-7", "digits", [dropped], dropped=drop)
    assert parse_chunk(data).dropped == drop


def _rezip(data: bytes, edit: Any) -> bytes:
    members = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            members[info.filename] = z.read(info)
    edit(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, body in members.items():
            z.writestr(name, body)
    return buf.getvalue()


def _npy(a: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _meta(members: dict[str, bytes], **change: Any) -> None:
    raw = np.load(io.BytesIO(members["meta.npy"]))
    doc = json.loads(raw.tobytes())
    doc.update(change)
    members["meta.npy"] = _npy(np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8))


GOOD = pack_chunk("cam-7", "digits", [record(), record(rid="r2")])[0]


def _compressed() -> bytes:
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(GOOD)) as src,
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z,
    ):
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    return buf.getvalue()


HOSTILE = {
    "empty": b"",
    "not a zip": b"PK\x03\x04garbage" * 10,
    "truncated": GOOD[: len(GOOD) // 2],
    "too large": GOOD + b"\0" * 100,
    "compressed members": _compressed(),
    "object array (pickle)": _rezip(
        GOOD, lambda m: m.__setitem__("version.npy", _npy(np.array([{}, {}], dtype=object)))
    ),
    "extra member": _rezip(GOOD, lambda m: m.__setitem__("evil.npy", _npy(np.zeros(1)))),
    "missing meta": _rezip(GOOD, lambda m: m.pop("meta.npy")),
    "meta not json": _rezip(
        GOOD, lambda m: m.__setitem__("meta.npy", _npy(np.frombuffer(b"{no", dtype=np.uint8)))
    ),
    "wrong format": _rezip(GOOD, lambda m: _meta(m, format="other")),
    "records disagree": _rezip(GOOD, lambda m: _meta(m, records=3)),
    "rows disagree": _rezip(GOOD, lambda m: _meta(m, rows=99)),
    "bad device id": _rezip(GOOD, lambda m: _meta(m, device_id="../x")),
    "bad drop": _rezip(GOOD, lambda m: _meta(m, dropped=["rm -rf"])),
    "bad count": _rezip(GOOD, lambda m: _meta(m, counts={"x": -1})),
    "label out of range": _rezip(
        GOOD, lambda m: m.__setitem__("label.npy", _npy(np.array([-5, 0, 0, 0], dtype=np.int32)))
    ),
    "offsets backwards": _rezip(
        GOOD, lambda m: m.__setitem__("rows.npy", _npy(np.array([0, 3, 4], dtype=np.int64)[::-1]))
    ),
    "tensor rows short": _rezip(
        GOOD, lambda m: m.__setitem__("in0.npy", _npy(np.zeros((3, 4), dtype=np.float32)))
    ),
    "header lies about size": _rezip(
        GOOD,
        lambda m: m.__setitem__(
            "in0.npy", m["in0.npy"].replace(b"(4, 4)", b"(9999999, 4)").replace(b"(4,4)", b"x")
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chunks_are_refused(name: str) -> None:
    data = HOSTILE[name]
    with pytest.raises(ContractError):
        parse_chunk(data, max_bytes=len(GOOD))


def test_the_good_chunk_parses() -> None:
    assert parse_chunk(GOOD, max_bytes=len(GOOD)).records == 2


@pytest.mark.parametrize(
    ("name", "args", "ok"),
    [
        ("capture-config", UploadSettings("digits", True).to_dict(), True),
        ("capture-config", {**UploadSettings("digits", True).to_dict(), "sample_ppm": -1}, False),
        ("capture-config", {**UploadSettings("digits", True).to_dict(), "drop": ["x"]}, False),
        ("capture-config", {**UploadSettings("digits", True).to_dict(), "enabled": 1}, False),
        ("capture-config", {**UploadSettings("digits", True).to_dict(), "path": "/"}, False),
        ("capture-upload", {"model": "digits", "ack": "", "max_bytes": 65536}, True),
        ("capture-upload", {"model": "digits", "ack": "a" * 64, "max_bytes": 65536}, True),
        ("capture-upload", {"model": "digits", "ack": "zz", "max_bytes": 65536}, False),
        ("capture-upload", {"model": "digits", "ack": "", "max_bytes": 1 << 30}, False),
        ("capture-upload", {"model": "../x", "ack": "", "max_bytes": 65536}, False),
    ],
)
def test_capture_command_arguments(name: str, args: dict[str, Any], ok: bool) -> None:
    if ok:
        parsed = parse_arguments(name, args)
        assert isinstance(parsed, UploadSettings | CaptureUploadArgs)
    else:
        with pytest.raises(CommandArgumentError):
            parse_arguments(name, args)
