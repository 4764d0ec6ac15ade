"""The packed telemetry encoding of every release still unpacks to its JSON, and the server
reads both forms alike.

``telemetry-packed-v1-2026-12/`` (written by ``make_packed_fixture.py``): ``batch.json``, a real
batch of two reports with drift windows and an event as the agent of 2026-12 wrote it;
``batch.packed-1.bin``, the same batch in the ``packed-1`` form; ``ack-accepts.json``, the ack a
server that reads it sends. Fixtures are added, never regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.wire.compact import PACKED_ENCODING, is_packed, unpack_message
from edge_agent.wire.telemetry import Batch, TelemetryAck, decode_message
from fleet_server.gateway.ingest_parse import parse_telemetry

DIR = Path(__file__).parent / "telemetry-packed-v1-2026-12"
DEV = "gateway-0001"


def test_the_packed_form_unpacks_to_its_json_byte_for_byte() -> None:
    packed = (DIR / "batch.packed-1.bin").read_bytes()
    body = (DIR / "batch.json").read_bytes()
    assert is_packed(packed)
    assert unpack_message(packed) == body
    assert decode_message(packed) == decode_message(body) == Batch.from_bytes(body)


def test_the_server_stores_the_same_entries_from_either_form() -> None:
    packed = parse_telemetry("telemetry", DEV, (DIR / "batch.packed-1.bin").read_bytes())
    plain = parse_telemetry("telemetry", DEV, (DIR / "batch.json").read_bytes())
    assert not isinstance(plain, str)
    assert packed == plain
    assert plain.refused == ()
    assert [type(e).__name__ for e in plain.entries] == ["TelemetryReport"] * 2 + ["Event"]
    windows = [w for e in plain.entries[:2] for m in e.models.values() for w in m.drift]
    assert windows, "the fixture must carry drift windows"


def test_acks_with_and_without_accepts_parse() -> None:
    ack = TelemetryAck.from_bytes((DIR / "ack-accepts.json").read_bytes())
    assert ack.accepts == (PACKED_ENCODING,)
    old = Path(__file__).parents[1] / "fixtures" / "telemetry" / "ack-v1.json"
    assert TelemetryAck.from_bytes(old.read_bytes().rstrip(b"\n")).accepts == ()
    # What an agent that predates the field reads: the same keys plus one it ignores.
    assert set(json.loads((DIR / "ack-accepts.json").read_bytes())) == {
        "schema_version",
        "type",
        "device_id",
        "upto_seq",
        "accepts",
    }
