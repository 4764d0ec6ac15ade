"""Properties of the packed telemetry encoding (``edge_agent.wire.compact``, issue 11).

Any tier-A view round-trips bit for bit through ``pack_view``; any canonical batch with such
views round-trips byte for byte through ``pack_message``; flipped, cut, overwritten or inserted
bytes of a packed view or message raise nothing but ``ContractError``, and the server's parse of
them returns a value or a reject reason, never an exception.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
from hostile_json import byte_mutated, only_typed
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.drift import FeatureEdges, TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.compact import pack_message, pack_view, unpack_message, unpack_view
from fleet_server.gateway.ingest_parse import parse_telemetry

BATCH = (
    Path(__file__).parents[1] / "compat" / "telemetry-packed-v1-2026-12" / "batch.json"
).read_bytes()
DEV = "gateway-0001"
BIG = 1 << 20

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
# Values the codes treat specially: small integers, float32-exact, anything else.
edge_value = st.one_of(st.integers(-(2**54), 2**54).map(float), finite.map(float), finite)


@st.composite
def edge_rows(draw: st.DrawFn, n_bins: int) -> tuple[float, ...]:
    values = sorted(set(draw(st.lists(edge_value, min_size=1, max_size=n_bins + 1))))
    out: list[float] = []
    for v in values:  # sometimes a point mass: v and the float right above it
        out.append(v)
        if draw(st.booleans()) and len(out) < n_bins + 1:
            out.append(math.nextafter(v, math.inf))
    out = sorted({x for x in out if math.isfinite(x)})[: n_bins + 1]
    if len(out) < 2:
        out = [out[0], math.nextafter(out[0], math.inf)] if out[0] < 1e308 else [0.0, 1.0]
    return tuple(out)


@st.composite
def views(draw: st.DrawFn) -> TierAView:
    n_bins = draw(st.integers(1, 12))
    f = draw(st.integers(1, 6))
    rows = tuple(draw(edge_rows(n_bins)) for _ in range(f))
    edges = FeatureEdges(n_bins, rows)
    counts = np.zeros((f, n_bins + 2), np.int64)
    count = np.zeros(f, np.int64)
    for j, row in enumerate(rows):
        used = draw(st.lists(st.integers(0, 2**40), min_size=len(row) + 1, max_size=len(row) + 1))
        counts[j, : len(row)] = used[:-1]
        counts[j, -1] = used[-1]
        count[j] = draw(st.integers(0, int(counts[j].sum())))
    nan = np.asarray(draw(st.lists(st.integers(0, 2**40), min_size=f, max_size=f)), np.int64)
    moments = st.lists(st.floats(width=64), min_size=f, max_size=f)
    return TierAView(edges, counts, nan, count, draw(moments), draw(moments))


@given(views())
def test_any_view_round_trips_bit_for_bit(view: TierAView) -> None:
    back = unpack_view(pack_view(view), max_bytes=BIG)
    assert back.to_bytes() == view.to_bytes()


def _batch_with(vs: list[TierAView]) -> bytes:
    doc = json.loads(BATCH)
    windows = [
        w
        for item in doc["items"]
        if item["type"] == "report"
        for m in item["models"].values()
        for w in m["drift"]
    ]
    for w, v in zip(windows, vs, strict=False):
        w["view"] = base64.b64encode(v.to_bytes()).decode("ascii")
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@given(st.lists(views(), min_size=1, max_size=4))
def test_any_batch_round_trips_byte_for_byte(vs: list[TierAView]) -> None:
    body = _batch_with(vs)
    assert unpack_message(pack_message(body)) == body


PACKED = pack_message(BATCH)
_FIRST = json.loads(BATCH)["items"][0]["models"]["digits"]["drift"][0]["view"]
VIEW = pack_view(TierAView.from_bytes(base64.b64decode(_FIRST)))


@given(st.data())
def test_damaged_packed_messages_raise_only_typed_errors(data: st.DataObject) -> None:
    damaged = data.draw(byte_mutated(PACKED))
    only_typed(unpack_message, damaged, ContractError)
    assert parse_telemetry("telemetry", DEV, damaged) is not None  # a value or a reason


@given(st.data())
def test_damaged_packed_views_raise_only_typed_errors(data: st.DataObject) -> None:
    damaged = data.draw(byte_mutated(VIEW))
    only_typed(lambda b: unpack_view(b, max_bytes=BIG), damaged, ContractError)


@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_raise_only_typed_errors(tail: bytes) -> None:
    only_typed(unpack_message, PACKED[:4] + tail, ContractError)
    only_typed(lambda b: unpack_view(b, max_bytes=BIG), b"\x01" + tail, ContractError)
