"""Property: whatever a device puts in any field of a telemetry batch, ``parse_telemetry`` never
raises, and whatever it hands to storage is storable by SQLite and PostgreSQL alike (no NUL, no
lone surrogate, integers within 2**53, finite numbers). Bounded budget, runs in the suite."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.wire.telemetry import Event, TelemetryReport
from fleet_server.gateway.ingest_parse import REFUSED_KIND, IngestItem, parse_telemetry
from fleet_server.registry.values import TelemetryEntry

REASONS = {"oversized", "malformed", "wrong_type", "device_mismatch"}

hostile_text = st.text(
    alphabet=st.sampled_from(["a", "\x00", "\ud800", "\udfff", "\U0001f600", "\x01", "é"]),
    max_size=8,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)
    ),
    max_leaves=8,
)


def _entries() -> list[dict[str, Any]]:
    report = TelemetryReport("dev-a", 1, 0.0, 1.0).to_dict()
    event = Event("dev-a", 2, "installed", 5.0, model="m", version=1, detail="d").to_dict()
    return [report, event]


def _storable(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) <= 2**53
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 1), field=st.data(), value=values)
def test_any_field_any_value_never_raises_and_only_storable_data_is_stored(
    which: int, field: st.DataObject, value: Any
) -> None:
    entries = _entries()
    key = field.draw(st.sampled_from(sorted(entries[which])), label="field")
    entries[which][key] = value
    doc = {"schema_version": 1, "type": "batch", "device_id": "dev-a", "items": entries}
    payload = json.dumps(doc).encode()  # ensure_ascii: hostile text travels as \\u escapes
    out = parse_telemetry("telemetry", "dev-a", payload)
    if isinstance(out, str):
        assert out in REASONS
        return
    assert isinstance(out, IngestItem)
    assert [e.seq for e in out.entries] == [1, 2] or key == "seq"
    for entry in out.entries:
        if isinstance(entry, TelemetryEntry):
            assert entry.kind == REFUSED_KIND
            assert _storable(dict(entry.payload))
        else:
            assert _storable(entry.to_dict()), entry.to_dict()
