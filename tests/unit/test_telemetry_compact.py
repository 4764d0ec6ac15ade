"""The packed telemetry encoding (issue 11): lossless, bounded, strict, and negotiated.

Covers ``edge_agent.wire.compact`` (packed views and messages: round trips on real drift windows
and on edge cases, a hostile table where every refusal is a ``ContractError``), the ack's
``accepts`` list, the server parse of both forms, and the uplink's negotiation: packed only
while the latest ack lists the encoding, JSON again after a resend or a reconnect.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clock import FakeClock
from edge_agent.drift import FeatureEdges, TierAView
from edge_agent.errors import ContractError
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import Uplink
from edge_agent.wire.compact import (
    MAGIC,
    PACKED_ENCODING,
    is_packed,
    pack_message,
    pack_view,
    unpack_document,
    unpack_message,
    unpack_view,
)
from edge_agent.wire.compact.message import ZDICT
from edge_agent.wire.compact.varint import Reader, put_float, put_uvarint
from edge_agent.wire.fields import MAX_PAYLOAD_BYTES
from edge_agent.wire.telemetry import Batch, TelemetryAck, TelemetryReport, decode_message
from fleet_server.gateway.ingest_parse import ACCEPTED_ENCODINGS, parse_telemetry

FIXTURE = Path(__file__).parents[1] / "compat" / "telemetry-packed-v1-2026-12"
DEV = "gateway-0001"
BIG = 1 << 20


def _batch_json() -> bytes:
    return (FIXTURE / "batch.json").read_bytes()


def _real_views() -> list[TierAView]:
    doc = json.loads(_batch_json())
    return [
        TierAView.from_bytes(base64.b64decode(w["view"]))
        for item in doc["items"]
        if item["type"] == "report"
        for m in item["models"].values()
        for w in m["drift"]
    ]


def _view(edges: tuple[tuple[float, ...], ...], n_bins: int, rng: np.random.Generator) -> TierAView:
    fe = FeatureEdges(n_bins, edges)
    counts = np.zeros((len(edges), n_bins + 2), np.int64)
    for j, row in enumerate(edges):
        counts[j, : len(row)] = rng.integers(0, 1000, len(row))
        counts[j, -1] = rng.integers(0, 1000)
    count = counts.sum(axis=1) - rng.integers(0, 2, len(edges))
    count = np.maximum(count, 0)
    nan = rng.integers(0, 5, len(edges))
    sums = rng.normal(0, 1e3, len(edges))
    return TierAView(fe, counts, nan, count, sums, np.abs(sums) * 7.25)


# --------------------------------------------------------------------------- round trips
def test_real_windows_pack_losslessly_and_small() -> None:
    views = _real_views()
    assert len(views) >= 2
    for v in views:
        packed = pack_view(v)
        back = unpack_view(packed, max_bytes=BIG)
        assert back == v
        assert back.to_bytes() == v.to_bytes()  # bit for bit, so merges stay exact
        assert len(packed) < len(v.to_bytes()) / 2


def test_awkward_values_survive_bit_for_bit() -> None:
    tiny = 5e-324
    edges = (
        (0.0, tiny),  # a point mass at 0: next-up
        (-1e308, -2.5, -0.0 + 1.0, 3.0, math.nextafter(3.0, 9.0), 1e308),
        (0.1, 0.2, 0.30000000000000004),
        (-(2.0**53), 2.0**53),  # integers just beyond the exact-integer code
        (float(np.float32(0.7)), float(np.float32(0.9))),  # float32-exact
    )
    v = _view(edges, 6, np.random.default_rng(1))
    nan_payload = np.frombuffer(np.uint64(0x7FF8_0000_DEAD_BEEF).tobytes(), np.float64)[0]
    v = TierAView(
        v.edges,
        v.counts,
        v.nan,
        v.count,
        np.array([math.inf, -math.inf, nan_payload, -0.0, 2.0**60]),
        np.array([math.nan, 0.0, 1e-320, 12345.0, 7.5]),
    )
    back = unpack_view(pack_view(v), max_bytes=BIG)
    assert back.to_bytes() == v.to_bytes()


def test_counts_up_to_int64_round_trip() -> None:
    fe = FeatureEdges(1, ((0.0, 1.0),))
    top = (1 << 63) - 1
    v = TierAView(fe, np.array([[0, top, 0]]), np.array([top]), np.array([top]), [1.0], [1.0])
    assert unpack_view(pack_view(v), max_bytes=BIG) == v


def test_message_round_trips_byte_for_byte_and_is_a_tenth() -> None:
    body = _batch_json()
    packed = pack_message(body)
    assert is_packed(packed)
    assert not is_packed(body)
    assert unpack_message(packed) == body
    assert len(packed) * 5 < len(body)
    assert decode_message(packed) == decode_message(body)


def test_a_report_without_windows_and_a_lone_report_pack_too() -> None:
    report = TelemetryReport(device_id=DEV, seq=3, window_start=1.0, window_end=31.0)
    for payload in (report.to_bytes(), Batch(DEV, (report,), floor=3).to_bytes()):
        assert unpack_message(pack_message(payload)) == payload


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"report", "seq":1}',  # not canonical: it would not unpack byte for byte
        b'{"schema_version":1,"type":"ack"}',  # only reports and batches travel packed
        b"[]",
        b"not json",
    ],
)
def test_pack_refuses_what_it_could_not_restore(payload: bytes) -> None:
    with pytest.raises(ContractError):
        pack_message(payload)


# --------------------------------------------------------------------------- hostile
def _deflate(body: bytes, zdict: bytes = ZDICT) -> bytes:
    d = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=zdict)
    return MAGIC + d.compress(body) + d.flush()


def _body(doc: dict[str, Any], views: list[bytes]) -> bytes:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    out = bytearray()
    put_uvarint(out, len(text))
    out += text
    for v in views:
        put_uvarint(out, len(v))
        out += v
    return bytes(out)


def _report_doc(views: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_batch_json())
    windows = [w for i in doc["items"] if i["type"] == "report" for w in _windows_of(i)]
    for i, w in enumerate(windows):
        w["view"] = i
    assert len(windows) >= views
    return doc


def _windows_of(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for m in report["models"].values():
        yield from m["drift"]


def _packed_views() -> list[bytes]:
    return [pack_view(v) for v in _real_views()]


def _header_view(n_bins: int, f: int) -> bytes:
    out = bytearray((1,))
    put_uvarint(out, n_bins)
    put_uvarint(out, f)
    return bytes(out) + b"\x00" * 9 * f


def _bomb() -> bytes:
    return _deflate(b"\x00" * (MAX_PAYLOAD_BYTES * 4))


def _view_edit(edit: str) -> bytes:
    fe = FeatureEdges(2, ((0.0, 1.0, 2.0),))
    v = TierAView(fe, np.array([[1, 2, 3, 4]]), np.array([0]), np.array([10]), [1.0], [1.0])
    good = bytearray(pack_view(v))
    # version, n_bins, f, m, then the edge codes 0.0, 1.0, 2.0 (integers: zigzag << 2 | 1)
    assert good[:7] == bytes((1, 2, 1, 3, 1, 9, 17))
    if edit == "version":
        good[0] = 2
    elif edit == "decreasing edges":
        good[5] = 17  # the second edge becomes 2.0, equal to the third
    elif edit == "next-up first":
        good[4] = 0
    elif edit == "unknown float code":
        good[4] = 4
    elif edit == "infinite count > bucketed":
        good[-3] = 11
    elif edit == "trailing":
        good += b"\x00"
    elif edit == "cut":
        del good[-1]
    return bytes(good)


VIEW_HOSTILE = {
    "empty": b"",
    "another version": _view_edit("version"),
    "zero features": bytes((1, 1, 0)),
    "bins beyond MAX_BINS": bytes((1, 0x81, 0x40, 1)) + b"\x00" * 20,
    "65536 features of 4096 bins (would allocate 2 GiB)": _header_view(4096, 65536),
    "more features than bytes": bytes((1, 4, 0x80, 0x80, 0x04)),
    "varint of 11 bytes": bytes((1,)) + b"\xff" * 11,
    "one edge": bytes((1, 1, 1, 1, 1)) + b"\x00" * 12,
    "edges not increasing": _view_edit("decreasing edges"),
    "next-up without a previous edge": _view_edit("next-up first"),
    "unknown float code": _view_edit("unknown float code"),
    "more infinite values than bucketed": _view_edit("infinite count > bucketed"),
    "trailing byte": _view_edit("trailing"),
    "cut": _view_edit("cut"),
}


@pytest.mark.parametrize("data", VIEW_HOSTILE.values(), ids=VIEW_HOSTILE.keys())
def test_hostile_views_are_refused_typed(data: bytes) -> None:
    with pytest.raises(ContractError):
        unpack_view(data, max_bytes=BIG)


def test_view_larger_than_the_cap_is_refused_before_it_allocates() -> None:
    v = _view(tuple((0.0, 1.0, 2.0) for _ in range(64)), 2, np.random.default_rng(2))
    packed = pack_view(v)
    assert unpack_view(packed, max_bytes=len(v.to_bytes())) == v
    with pytest.raises(ContractError, match="exceed"):
        unpack_view(packed, max_bytes=len(v.to_bytes()) - 1)


MESSAGE_HOSTILE = {
    "JSON": b'{"type":"batch"}',
    "another format byte": b"EFP\x02" + _deflate(b"")[4:],
    "not DEFLATE": MAGIC + b"\xff\xff\xff\xff",
    "cut DEFLATE": pack_message(_batch_json())[:-5],
    "bytes after the DEFLATE stream": pack_message(_batch_json()) + b"\x00",
    "another dictionary": _deflate(_body(_report_doc(2), _packed_views()), zdict=ZDICT + b"#"),
    "a DEFLATE bomb": _bomb(),
    "JSON length beyond the body": _deflate(b"\xff\xff\x03{}"),
    "not a report or batch": _deflate(_body({"type": "ack"}, [])),
    "too few views": _deflate(_body(_report_doc(2), _packed_views()[:-1])),
    "views left over": _deflate(_body(_report_doc(2), [*_packed_views(), _packed_views()[0]])),
    "a view index out of order": _deflate(
        _body(
            json.loads(json.dumps(_report_doc(2)).replace('"view": 0', '"view": 5', 1)),
            _packed_views(),
        )
    ),
    "a view still in base64": _deflate(_body(json.loads(_batch_json()), [])),
    "a bad packed view": _deflate(_body(_report_doc(2), [b"\x01", *_packed_views()[1:]])),
}


@pytest.mark.parametrize("data", MESSAGE_HOSTILE.values(), ids=MESSAGE_HOSTILE.keys())
def test_hostile_messages_are_refused_typed_and_counted_malformed(data: bytes) -> None:
    with pytest.raises(ContractError):
        unpack_message(data)
    if is_packed(data):
        assert parse_telemetry("telemetry", DEV, data) == "malformed"


def test_views_that_rebuild_beyond_the_cap_are_refused() -> None:
    packed = pack_message(_batch_json())
    with pytest.raises(ContractError, match="beyond"):
        unpack_message(packed, max_bytes=len(_batch_json()) - 1)
    assert unpack_message(packed, max_bytes=len(_batch_json())) == _batch_json()


@pytest.mark.parametrize(
    ("data", "hi", "values", "error"),
    [
        (b"\x00\x7f", 1 << 64, [0, 127], None),  # one-byte varints (the fast path)
        (b"\x80\x01\x05", 1 << 64, [128, 5], None),  # two bytes, then one
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", (1 << 64) - 1, [(1 << 64) - 1], None),
        (b"\x05", 4, [], "value 5 above 4 (at byte 1)"),  # one byte above the bound
        (b"\x80\x01", 127, [], "value 128 above 127 (at byte 2)"),
        (b"", 1 << 64, [], "truncated varint (at byte 0)"),
        (b"\x7f\x80", 1 << 64, [127], "truncated varint (at byte 2)"),
        (b"\x80" * 10 + b"\x01", 1 << 64, [], "varint longer than 10 bytes (at byte 10)"),
    ],
)
def test_reader_varints_and_their_errors(
    data: bytes, hi: int, values: list[int], error: str | None
) -> None:
    r = Reader(data, "test")
    got = [r.uvarint(hi) for _ in values]
    assert got == values
    if error is None:
        assert r.remaining == 0
        return
    with pytest.raises(ContractError) as exc:
        r.uvarint(hi)
    assert str(exc.value) == f"test: {error}"


def test_float_codes_are_canonical_where_it_matters() -> None:
    out = bytearray()
    for x in (0.0, -15.0, 15.0):
        put_float(out, x)
    assert len(out) == 3  # small integers: one byte each


# --------------------------------------------------------------------------- server parse
def test_the_server_parses_both_forms_alike() -> None:
    body = _batch_json()
    as_json = parse_telemetry("telemetry", DEV, body)
    as_packed = parse_telemetry("telemetry", DEV, pack_message(body))
    assert not isinstance(as_json, str)
    assert not isinstance(as_packed, str)
    assert as_json == as_packed
    assert PACKED_ENCODING in ACCEPTED_ENCODINGS


def test_a_packed_message_of_another_device_is_refused() -> None:
    assert parse_telemetry("telemetry", "other-dev", pack_message(_batch_json())) == (
        "device_mismatch"
    )


def test_a_bad_item_in_a_packed_batch_becomes_a_placeholder() -> None:
    doc = json.loads(_batch_json())
    doc["items"][0]["models"]["digits"]["latency_buckets"] = [1, 2]  # the wrong length
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    parsed = parse_telemetry("telemetry", DEV, pack_message(body))
    assert not isinstance(parsed, str)
    assert parsed.refused == (("malformed_entry", 1),)
    assert len(parsed.entries) == 3


# --------------------------------------------------------------------------- ack
def test_ack_lists_encodings_and_old_acks_list_none() -> None:
    old = TelemetryAck(DEV, 4)
    assert b"accepts" not in old.to_bytes()  # older acks stay byte-identical
    assert TelemetryAck.from_bytes(old.to_bytes()).accepts == ()
    new = TelemetryAck(DEV, 4, accepts=(PACKED_ENCODING,))
    assert TelemetryAck.from_bytes(new.to_bytes()) == new


@pytest.mark.parametrize("accepts", ["packed-1", [1], ["a b"], ["x"] * 9])
def test_ack_with_a_bad_accepts_list_is_refused(accepts: object) -> None:
    d = {**TelemetryAck(DEV, 1).to_dict(), "accepts": accepts}
    with pytest.raises(ContractError):
        TelemetryAck.from_dict(d)


# --------------------------------------------------------------------------- negotiation
class Wire:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append(payload)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db", 1 << 20) as b:
        yield b


def _uplink(box: Outbox, wire: Wire, clock: FakeClock) -> Uplink:
    return Uplink(
        box, wire, device_id=DEV, telemetry_topic="p/telemetry", clock=clock, ack_timeout=5.0
    )


def _report(seq: int) -> TelemetryReport:
    report = json.loads(_batch_json())["items"][0]  # a real report with drift windows
    return TelemetryReport.from_dict({**report, "seq": seq})


def _ack(upto: int, *accepts: str) -> bytes:
    return TelemetryAck(DEV, upto, accepts=accepts).to_bytes()


def test_uplink_packs_only_after_an_ack_lists_the_encoding(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock)
    up.add_report(_report(0))
    assert up.pump()
    assert not is_packed(wire.sent[-1])  # nothing heard from the server yet: JSON
    up.add_report(_report(0))
    up.on_ack(_ack(1))  # an older server: no accepts
    assert not is_packed(wire.sent[-1])
    up.add_report(_report(0))
    up.on_ack(_ack(2, PACKED_ENCODING))
    assert is_packed(wire.sent[-1])
    sent = Batch.from_bytes(unpack_message(wire.sent[-1]))
    assert [i.seq for i in sent.items] == [3]
    assert up.stats().packed_sent == 1
    up.add_report(_report(0))
    up.on_ack(_ack(3, "packed-9"))  # a server that reads only another format
    assert not is_packed(wire.sent[-1])


def test_uplink_resends_as_json_and_stays_json_until_told(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock)
    up.add_report(_report(0))
    up.add_report(_report(0))
    up.pump()
    up.on_ack(_ack(0, PACKED_ENCODING))  # acknowledges nothing, but lists the encoding
    assert len(wire.sent) == 1  # no progress: the batch in flight waits for its timeout
    clock.now += 5.1
    assert up.pump()  # resend: perhaps the server changed; JSON
    assert not is_packed(wire.sent[-1])
    up.on_ack(_ack(2))  # a server that does not read it
    up.add_report(_report(0))
    up.pump()
    assert not any(is_packed(p) for p in wire.sent)


def test_uplink_forgets_the_encoding_on_reconnect(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock)
    up.add_report(_report(0))
    up.pump()
    up.add_report(_report(0))
    up.on_ack(_ack(1, PACKED_ENCODING))
    assert is_packed(wire.sent[-1])
    up.reset_in_flight()
    up.pump()
    assert not is_packed(wire.sent[-1])


@pytest.mark.parametrize("data", MESSAGE_HOSTILE.values(), ids=MESSAGE_HOSTILE.keys())
def test_hostile_messages_are_refused_by_the_document_reader_too(data: bytes) -> None:
    with pytest.raises(ContractError):
        unpack_document(data)


def test_the_document_reader_gives_what_the_json_reader_gives() -> None:
    packed = pack_message(_batch_json())
    assert unpack_document(packed) == json.loads(_batch_json())
    with pytest.raises(ContractError, match="beyond"):
        unpack_document(packed, max_bytes=len(_batch_json()) - 1)
    assert unpack_document(packed, max_bytes=len(_batch_json())) == json.loads(_batch_json())


@pytest.mark.parametrize(
    "grow",
    [
        ("1e5", "100000.0"),  # an exponent the canonical form spells out
        ("\u00e9", "\\u00e9"),  # raw UTF-8, escaped in ASCII
    ],
    ids=["exponent", "raw-utf8"],
)
def test_a_json_part_that_grows_when_made_canonical_is_bounded_like_the_json_reader(
    grow: tuple[str, str],
) -> None:
    """The document reader's size bound is the rebuilt canonical JSON, as unpack_message's is:
    a JSON part sent in a shorter, non-canonical spelling cannot carry a document past the cap."""
    raw, canonical = grow
    doc = _report_doc(2)
    doc["x"] = "PLACEHOLDER"
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    value = (
        f"[{','.join([raw] * 300)}]" if raw == "1e5" else json.dumps(raw * 300, ensure_ascii=False)
    )
    body_text = text.replace('"PLACEHOLDER"', value).encode()
    out = bytearray()
    put_uvarint(out, len(body_text))
    out += body_text
    for v in _packed_views():
        put_uvarint(out, len(v))
        out += v
    data = _deflate(bytes(out))
    rebuilt = len(unpack_message(data))
    assert rebuilt > len(body_text) + 300  # the canonical spelling is longer
    cap = rebuilt - 1
    with pytest.raises(ContractError, match="beyond"):
        unpack_message(data, max_bytes=cap)
    with pytest.raises(ContractError, match="beyond"):
        unpack_document(data, max_bytes=cap)
    assert unpack_document(data, max_bytes=rebuilt) == json.loads(unpack_message(data))
    assert canonical.encode() in unpack_message(data)


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.sampled_from(["a", "\x00", "\ud800", "é", "-"]), max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "p50", "ok"]), st.integers(-2, 2), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=_FIELD_VALUES)
def test_packed_and_json_parse_alike_whatever_a_field_holds(
    data: st.DataObject, value: Any
) -> None:
    """The server's packed path (document, no JSON text) decides exactly as its JSON path."""
    doc = json.loads(_batch_json())
    item = data.draw(st.sampled_from(doc["items"]), label="item")
    target = item
    if item["type"] == "report" and data.draw(st.booleans(), label="inside a model"):
        target = item["models"]["digits"]
        if data.draw(st.booleans(), label="inside a drift window") and target["drift"]:
            target = target["drift"][0]
    key = data.draw(st.sampled_from(sorted(k for k in target if k != "view")), label="key")
    target[key] = value
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    try:
        packed = pack_message(body)
    except ContractError:
        return  # not canonical JSON of a report or batch: no agent packs it
    assert parse_telemetry("telemetry", DEV, packed) == parse_telemetry("telemetry", DEV, body)
