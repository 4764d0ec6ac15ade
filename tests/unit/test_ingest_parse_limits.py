"""fleet_server.gateway.ingest_parse: the wire's integer limit holds on the salvage path too."""

from __future__ import annotations

import json

from edge_agent.wire.fields import MAX_INT
from edge_agent.wire.telemetry import TelemetryReport
from fleet_server.gateway.ingest_parse import IngestItem, parse_telemetry
from fleet_server.registry.values import TelemetryEntry


def report(device: str, seq: int) -> TelemetryReport:
    return TelemetryReport(device_id=device, seq=seq, window_start=0.0, window_end=1.0)


def test_salvage_keeps_seqs_up_to_the_wire_integer_limit() -> None:
    # One bad entry sends the batch through the salvage parser, which checks each ``seq``
    # itself: up to MAX_INT (2**53 - 1) it is kept, one more refuses the whole message.
    bad = {**report("cam-1", 1).to_dict(), "models": "not a mapping"}

    def batch(last_seq: int) -> bytes:
        last = {**report("cam-1", 2).to_dict(), "seq": last_seq}
        doc = {"schema_version": 1, "type": "batch", "device_id": "cam-1", "items": [bad, last]}
        return json.dumps(doc).encode()

    item = parse_telemetry("telemetry", "cam-1", batch(MAX_INT))
    assert isinstance(item, IngestItem)
    assert [e.seq for e in item.entries] == [1, MAX_INT]
    assert isinstance(item.entries[0], TelemetryEntry)
    assert parse_telemetry("telemetry", "cam-1", batch(MAX_INT + 1)) == "malformed"
