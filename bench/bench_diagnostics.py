"""Remote diagnostics cost: a log fetch and a support-bundle upload, vs bare paho over Mosquitto.

One real Mosquitto (mutual TLS, the fleet's ACLs, from ``tests/mosquitto.py``), the gateway
with ``Diagnostics`` on the server's session, and one agent (``dev-a``: real store, sync loop and
command runner) whose log ring holds ``--records`` records. In alternating rounds it measures:

* ``logs``: ``Diagnostics.issue("logs")`` (sign, publish) -> agent verifies, queries its ring,
  answers -> gateway records the answer; the time until the record is ``answered`` and the
  answer's bytes;
* ``bare paho, answer-sized``: a bare paho MQTT v5 request/response between two other
  identities on the same broker (``w1.server`` -> ``dev-b``, QoS 1, correlation data) whose
  response has the logs answer's size: the floor any MQTT round trip of those bytes pays here;
* ``support-bundle``: issue -> agent builds the tar.gz, answers with its offer -> the server
  pulls every block (windows of 16 x 64 KiB) and verifies the SHA-256; the time until
  ``uploaded`` and the archive's bytes;
* ``bare paho, bundle-sized``: one request, then the responder publishes the same number of
  64 KiB QoS 1 messages; the time until the last arrives.

Times are wall-clock including the polling of the command record (every 1 ms).

    .venv/bin/python bench/bench_diagnostics.py --rounds 20 --markdown
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from paho.mqtt import client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from bundles import build_digits_bundles  # noqa: E402
from edge_agent.common.logring import LogRing  # noqa: E402
from edge_agent.wire.topics import Topics  # noqa: E402
from fleet import FleetHarness, start_device, wait_until  # noqa: E402
from fleet_server.diagnostics.book import CommandRecord  # noqa: E402
from fleet_server.diagnostics.service import Diagnostics  # noqa: E402
from mosquitto import fleet_broker  # noqa: E402

BLOCK = 64 * 1024


def _wait(diag: Diagnostics, record: CommandRecord, states: tuple[str, ...]) -> CommandRecord:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = diag.get(record.id)
        if r.state in states:
            return r
        time.sleep(0.001)
    raise RuntimeError(f"{record.name} not {states} in time: {diag.get(record.id).state}")


class Bare:
    """A bare paho requester (``w1.server``) and responder (``dev-b``) on the fleet broker."""

    def __init__(self, port: int, creds: Any, prefix: str) -> None:
        topics = Topics(prefix)
        self.req = topics.device("commands", "dev-b")
        self.resp = topics.device("command_resp", "dev-b")
        self.got = threading.Event()
        self.count = 0
        self.want = 1
        self.size = 1
        self.blocks = 1

        def make(cid: str) -> Any:
            c = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=cid, protocol=MQTTProtocolVersion.MQTTv5
            )
            c.tls_set(str(creds[cid].ca), str(creds[cid].cert), str(creds[cid].key))
            c.on_socket_open = lambda _c, _u, s: s.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            return c

        self.server = make("w1.server")
        self.device = make("dev-b")

        def respond(c: Any, _u: Any, m: Any) -> None:
            p = Properties(PacketTypes.PUBLISH)
            p.CorrelationData = m.properties.CorrelationData
            for _ in range(self.blocks):
                c.publish(self.resp, b"x" * self.size, 1, properties=p)

        def received(_c: Any, _u: Any, _m: Any) -> None:
            self.count += 1
            if self.count >= self.want:
                self.got.set()

        self.device.on_message = respond
        self.server.on_message = received
        for c, sub in ((self.device, self.req), (self.server, self.resp)):
            c.connect("127.0.0.1", port)
            c.loop_start()
            c.subscribe(sub, 1)
        time.sleep(0.5)

    def round_trip(self, size: int, blocks: int = 1) -> float:
        self.size, self.blocks, self.want, self.count = size, blocks, blocks, 0
        self.got.clear()
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic, p.CorrelationData = self.resp, uuid.uuid4().bytes
        t = time.perf_counter()
        self.server.publish(self.req, b"{}", 1, properties=p)
        if not self.got.wait(60):
            raise RuntimeError("bare round trip timed out")
        return time.perf_counter() - t

    def close(self) -> None:
        for c in (self.server, self.device):
            c.loop_stop()
            c.disconnect()


def run(rounds: int, records: int) -> list[tuple[str, float, float, int]]:
    """Rows of (label, median ms, p90 ms, bytes)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bundles = build_digits_bundles(tmp / "bundles")
        with fleet_broker(tmp / "mqtt", ("dev-a", "dev-b"), workers=("w1.server",)) as broker:
            fleet = FleetHarness(broker, bundles.keys, tmp / "fleet")
            diag = Diagnostics(
                fleet.registry,
                fleet.client,
                Topics(broker.prefix),
                [bundles.keys.signer("online-1")],
                tmp / "diagnostics",
                clock=lambda: datetime.now(UTC),
            )
            fleet.gateway.attach_diagnostics(diag)
            diag.start()
            ring = LogRing(max_records=records + 100, max_bytes=64 * 1024 * 1024)
            logger = logging.getLogger("bench.device")
            logger.propagate = False
            logger.addHandler(ring)
            logger.setLevel(logging.INFO)
            for i in range(records):
                logger.info("request %d served by digits v1 in %.3f ms (batch of %d)", i, 1.5, 8)
            config = fleet.agent_config("dev-a", commands_per_minute=600)
            device = start_device(config, log_ring=ring)
            fleet.devices["dev-a"] = device
            wait_until(lambda: "dev-a" in fleet.gateway.online(), 30, what="dev-a online")
            bare = Bare(broker.port, broker.creds, broker.prefix)
            logs_t: list[float] = []
            bare_logs_t: list[float] = []
            bundle_t: list[float] = []
            bare_bundle_t: list[float] = []
            answer_bytes = bundle_bytes = 0
            try:
                for _ in range(rounds):
                    t = time.perf_counter()
                    (rec,) = diag.issue(
                        "logs", {"max_lines": 5000, "max_bytes": 192 * 1024}, device_id="dev-a"
                    ).commands
                    done = _wait(diag, rec, ("answered", "refused"))
                    logs_t.append(time.perf_counter() - t)
                    answer_bytes = len(json.dumps(done.answer, separators=(",", ":")))
                    bare_logs_t.append(bare.round_trip(answer_bytes))

                    t = time.perf_counter()
                    (rec,) = diag.issue("support-bundle", {}, device_id="dev-a").commands
                    done = _wait(diag, rec, ("uploaded", "upload_failed", "refused"))
                    bundle_t.append(time.perf_counter() - t)
                    if done.state != "uploaded":
                        raise RuntimeError(f"support bundle {done.state}: {done.upload}")
                    bundle_bytes = int((done.upload or {})["length"])
                    bare_bundle_t.append(bare.round_trip(BLOCK, -(-bundle_bytes // BLOCK)))
            finally:
                bare.close()
                diag.close()
                fleet.close()

    def row(label: str, xs: list[float], size: int) -> tuple[str, float, float, int]:
        ms = sorted(x * 1000 for x in xs)
        return label, statistics.median(ms), ms[int(0.9 * (len(ms) - 1))], size

    return [
        row("logs (sign, answer, record)", logs_t, answer_bytes),
        row("bare paho, answer-sized", bare_logs_t, answer_bytes),
        row("support-bundle (build, pull, verify)", bundle_t, bundle_bytes),
        row("bare paho, bundle-sized", bare_bundle_t, -(-bundle_bytes // BLOCK) * BLOCK),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--records", type=int, default=2000, help="log records in the ring")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The bare responder answers on dev-b's command_resp topic, which the gateway reads too and
    # refuses (not an answer): expected here, not worth a warning per round.
    logging.getLogger("fleet_server.gateway.gateway").setLevel(logging.ERROR)
    rows = run(args.rounds, args.records)
    if args.markdown:
        print(f"{args.rounds} alternating rounds, {args.records} log records in the ring\n")
        print("| path | median ms | p90 ms | bytes |")
        print("|---|---:|---:|---:|")
        for label, med, p90, size in rows:
            print(f"| {label} | {med:.1f} | {p90:.1f} | {size:,} |")
    else:
        for label, med, p90, size in rows:
            print(f"{label:<40} median {med:8.1f} ms  p90 {p90:8.1f} ms  {size:>10,} bytes")


if __name__ == "__main__":
    main()
