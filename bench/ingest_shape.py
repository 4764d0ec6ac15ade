"""Telemetry at the real message shape for ``bench_ingest_workers.py`` and ``profile_ingest.py``.

Owns: the report pool (``real_reports``: one device's reports built by the real agent the way
``bench_telemetry_bytes.py`` builds them, the digits MLP serving ``rate`` requests/s with the
drift and sync settings of ``deploy/agent.example.toml``, so tier-A drift windows close and ride
in the reports that close them), ``Shape`` (turns that pool into the message of any device and
seq cheaply: one report per ``Batch`` with ``floor = seq``, canonical JSON or packed-1), and a
``fleetsim.Sim`` whose devices send those messages (``ShapedPool``: the ``bench_fleet.Pool`` of
simulated device processes, running ``shaped_worker_main``).

Each device walks the pool from its own offset, so at any moment some devices send the rare
heavy report with drift windows and most send the light ones, in the proportion the agent does.

Does not measure anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import sys
import tempfile
import zlib
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import Pool
from edge_agent.wire.compact import MAGIC, pack_message
from edge_agent.wire.compact.message import ZDICT
from edge_agent.wire.compact.varint import Reader, put_uvarint
from edge_agent.wire.telemetry import Batch, TelemetryReport
from fleetsim import Dev, Sim

ROOT = Path(__file__).resolve().parents[1]
_DEVICE = "shape-sentinel-device"
_SEQ = 987_654_321
_WBITS = -15  # the packed-1 format: raw DEFLATE at level 9 (edge_agent.wire.compact.message)
_LEVEL = 9


def real_reports(rate: float, minutes: float) -> list[TelemetryReport]:
    """One device's reports at ``rate`` requests/s over ``minutes`` simulated minutes."""
    import bench_telemetry_bytes as tb
    from edge_agent.config import load_config

    example = load_config(ROOT / "deploy" / "agent.example.toml", env={})
    with tempfile.TemporaryDirectory() as tmp:
        bundle, root, rows = tb.build_bundle(Path(tmp))
        return tb.simulate(example, bundle, root, rows, rate, minutes)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Templates of the one-report messages of a pool (device id and seq left to fill in).

    JSON: the canonical payload with two fill-ins. Packed-1: packing a report with drift
    windows costs about 1 ms (the views' varint coding), which would load the device
    processes on a 2-core machine, so the packed body is kept per template (the JSON with
    each view replaced by its index, then the packed views) and only the JSON part is filled
    in and the whole body deflated per message: byte for byte what ``pack_message`` gives
    (checked for every template when the shape is made).
    """

    templates: tuple[bytes, ...]
    packed: bool
    bodies: tuple[tuple[bytes, bytes], ...] = ()  # packed: (JSON part, views part) per template

    @classmethod
    def of(cls, reports: list[TelemetryReport], packed: bool) -> Shape:
        out = []
        for r in reports:
            report = dataclasses.replace(r, device_id=_DEVICE, seq=_SEQ)
            data = Batch(_DEVICE, (report,), floor=_SEQ).to_bytes()
            # The fill-ins must occur exactly where the envelope puts them.
            assert data.count(_DEVICE.encode()) == 2
            assert data.count(str(_SEQ).encode()) == 2
            out.append(data)
        if not packed:
            return cls(tuple(out), packed)
        bodies = []
        for data in out:
            body = zlib.decompressobj(_WBITS, zdict=ZDICT).decompress(pack_message(data)[4:])
            r = Reader(body, "bench body")
            text = r.take(r.uvarint())
            bodies.append((text, r.take(r.remaining)))
        shape = cls(tuple(out), packed, tuple(bodies))
        for i in range(len(out)):
            json_form = Shape(shape.templates, False).message("gateway-0001", 12345 + i)
            assert shape.message("gateway-0001", 12345 + i) == pack_message(json_form)
        return shape

    def message(self, device_id: str, seq: int, offset: int = 0) -> bytes:
        """The message carrying report ``seq`` of ``device_id`` (canonical JSON or packed-1)."""
        i = (seq + offset) % len(self.templates)
        t = self.bodies[i][0] if self.packed else self.templates[i]
        data = t.replace(_DEVICE.encode(), device_id.encode()).replace(
            str(_SEQ).encode(), str(seq).encode()
        )
        if not self.packed:
            return data
        body = bytearray()
        put_uvarint(body, len(data))
        body += data
        body += self.bodies[i][1]
        deflate = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, zdict=ZDICT)
        return MAGIC + deflate.compress(bytes(body)) + deflate.flush()

    def mean_bytes(self) -> float:
        sizes = [len(self.message("gateway-0001", i + 1)) for i in range(len(self.templates))]
        return sum(sizes) / len(sizes)

    def windows_share(self) -> float:
        """Share of the pool's reports that carry drift windows."""
        return sum(b'"drift":[{' in t for t in self.templates) / len(self.templates)


class ShapedSim(Sim):
    """``fleetsim.Sim`` sending one real-shaped report per message (``Shape``).

    Two changes to the simulator's commands: ``("shape", Shape)`` switches the encoding
    (answered ``("shape",)``), and a ``flood`` (the bare baseline) leaves every device's seq
    and unacknowledged message where they were, so a bare run can sit between two runs into
    the registry: the flood's seqs never reach the registry (the bench clears the workers'
    sessions first) and are sent again, for real, by the next run.
    """

    shape: Shape
    offsets: dict[str, int]

    def _build(self, dev: Dev, now: float) -> None:
        seq = dev.seq + 1
        dev.inflight = self.shape.message(dev.id, seq, self.offsets[dev.id])
        dev.seq = dev.inflight_last = seq

    def _command(self, cmd: tuple[Any, ...]) -> bool:
        if cmd[0] == "shape":
            self.shape = cmd[1]
            self.conn.send(("shape",))
            return True
        return super()._command(cmd)

    def _run_telemetry(self, mode: str, params: dict[str, Any]) -> None:
        kept = {d.id: (d.seq, d.acked, d.inflight, d.inflight_last) for d in self.devs}
        super()._run_telemetry(mode, params)
        if mode == "flood":  # and a message still unacknowledged is sent again at once
            for dev in self.devs:
                dev.seq, dev.acked, dev.inflight, dev.inflight_last = kept[dev.id]
                dev.sent_at = 0.0


def shaped_worker_main(
    conn: Connection, host: str, port: int, creds: dict[str, Any], shape: Shape
) -> None:
    """``fleetsim.worker_main`` with ``ShapedSim``."""
    from fleetbench import raise_nofile

    raise_nofile()
    sim = ShapedSim(conn, host, port, creds)
    sim.shape = shape
    sim.offsets = {d.id: zlib.crc32(d.id.encode()) for d in sim.devs}
    try:
        sim.run()
    finally:
        for dev in sim.devs:
            with contextlib.suppress(Exception):
                dev.client.disconnect()
        conn.close()


class ShapedPool(Pool):
    """``bench_fleet.Pool`` whose device processes send ``shape`` messages."""

    def __init__(
        self, processes: int, broker: Any, creds: dict[str, Any], ids: list[str], shape: Shape
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.progress: dict[int, int] = {}
        for w in range(processes):
            mine = {d: (creds[d].ca, creds[d].cert, creds[d].key) for d in ids[w::processes]}
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=shaped_worker_main,
                args=(child, broker.host, broker.port, mine, shape),
                daemon=True,
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
