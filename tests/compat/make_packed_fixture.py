"""Add a compatibility fixture of the packed telemetry encoding (issue 11).

Writes, into a new directory (``python tests/compat/make_packed_fixture.py <dir-name>``): a real
batch of two reports with drift windows of the digits model under 10 requests/s (built by
``bench/bench_telemetry_bytes.py``'s simulation, the way the agent builds them) and an event, as
today's canonical JSON (``batch.json``) and in the packed form agents send to servers that
accept it (``batch.packed-1.bin``), and an acknowledgement that lists the packed encoding
(``ack-accepts.json``). Commit the directory and never regenerate it: test_compat_packed.py
checks that today's parsers still read both forms alike.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from edge_agent.config import load_config
from edge_agent.wire.compact import PACKED_ENCODING, pack_message
from edge_agent.wire.telemetry import Batch, Event, TelemetryAck

ROOT = Path(__file__).resolve().parents[2]


def main(name: str) -> None:
    dest = Path(__file__).parent / name
    if dest.exists():
        raise SystemExit(f"{dest} exists; compatibility fixtures are never regenerated")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_telemetry_bytes import DEVICE_ID, build_bundle, simulate

    example = load_config(ROOT / "deploy" / "agent.example.toml", env={})
    with tempfile.TemporaryDirectory() as tmp:
        bundle, root, rows = build_bundle(Path(tmp))
        reports = simulate(example, bundle, root, rows, 10.0, 6.0)
    with_windows = [r for r in reports if any(m.drift for m in r.models.values())]
    first = with_windows[0]
    second = next(r for r in reports if r.seq > first.seq)
    event = Event(DEVICE_ID, second.seq + 1, "drift_alert", second.window_end, "digits", 1, "x")
    batch = Batch(DEVICE_ID, (first, second, event), floor=first.seq)
    body = batch.to_bytes()
    dest.mkdir(parents=True)
    (dest / "batch.json").write_bytes(body)
    (dest / "batch.packed-1.bin").write_bytes(pack_message(body))
    ack = TelemetryAck(DEVICE_ID, event.seq, accepts=(PACKED_ENCODING,))
    (dest / "ack-accepts.json").write_bytes(ack.to_bytes())
    print(f"wrote {dest}: {len(body)} bytes of JSON, packed {len(pack_message(body))}")


if __name__ == "__main__":
    main(sys.argv[1])
