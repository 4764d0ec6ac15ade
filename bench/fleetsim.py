"""Simulated devices for ``bench_fleet.py``: many paho TLS clients in one selector loop.

One worker process (``worker_main``) owns a slice of the fleet: one paho MQTT v5 client per
device, each with its own certificate, all driven from a single ``selectors`` loop with
``loop_read``/``loop_write``/``loop_misc`` (no thread per client). Work is event driven so a
worker can hold thousands of clients: a socket is polled for writing only while paho has
bytes queued for it, reconnects and telemetry sends wait in one timer heap (one live timer per
device), and ``loop_misc`` (keepalive) visits a rotating slice of the devices per sweep. Only
bundle downloads still visit every device per sweep (``DOWNLOAD_SWEEP``). The devices speak the real
wire formats: telemetry ``Batch``es of ``TelemetryReport``s with ``seq``/``floor``, one batch
in flight until its ``TelemetryAck``; bundle blocks with ``BlockRequest``/``BlockData`` and an
in-memory ``Progress`` driven by the same windowed request rule as ``edge_agent.sync.download``
(every block is compared byte for byte with the bundle; nothing is written to disk).

The parent sends commands over a pipe (also registered in the selector) and gets one reply
per command; during downloads the worker also sends ``("progress", blocks)`` every 0.2 s.
Every pass of the loop is bounded (``PASS_BUDGET`` seconds of socket reads, one ``loop_read``
per socket per visit, which paho-mqtt 2.2 limits to one packet unless QoS 2 flows are in
flight): readable sockets wait in a FIFO backlog, served oldest first, and a socket with more
to read (a TLS record already decrypted) goes back to its end, so the pipe is looked at
between two passes however many blocks are queued for the devices. (The loop used to call
``loop_read`` again while ``pending()`` was non-zero; a 64 KiB block rarely ends on a TLS
record boundary, so that read one socket for as long as the broker kept it fed.)

Nothing a device receives is kept: a block is compared with the one copy of the bundle the
worker holds and counted (the bench reports the workers' peak RSS after each delivery).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
import selectors
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edge_agent.errors import EdgefleetError
from edge_agent.sync.uplink import ack_wait
from edge_agent.wire.telemetry import (
    LATENCY_BUCKETS_MS,
    Batch,
    ModelStats,
    Resources,
    TelemetryAck,
    TelemetryReport,
)
from edge_agent.wire.transfer import MAX_RANGES, BlockData, BlockPlan, BlockRequest
from edge_agent.wire.transfer_progress import Progress

PREFIX = "edgefleet"
BARE_TOPIC = f"{PREFIX}/broadcast/bare"
SWEEP_EVERY = 0.05
DOWNLOAD_SWEEP = 0.1  # seconds between two visits of every device's download rule
MISC_EVERY = 5.0  # seconds between two ``loop_misc`` calls of one device (keepalive 60 s)
CONNECTS_PER_PASS = 5  # blocking TLS handshakes between two socket polls while reconnecting
PASS_BUDGET = 0.05  # seconds of socket reads in one pass, then the pipe and timers again


def make_report(device_id: str, seq: int, now: float) -> TelemetryReport:
    """A realistic one-model window report (~1 KB of JSON)."""
    n = 100 + seq % 7
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    buckets[2], buckets[3], buckets[4] = n - 12, 10, 2
    return TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=now - 10.0,
        window_end=now,
        started_at=now - 3600.0,
        agent_version="0.1.0",
        models={
            "digits": ModelStats(
                version=3,
                outcomes={"ok": n - 1, "error": 0, "rejected": 1},
                sources={"device": n - 1},
                latency_buckets=tuple(buckets),
                latency_ms={"p50": 3.1, "p90": 7.9, "p99": 14.2},
                rejects_by_reason={"shape": 1},
                dropped_rows_by_reason={},
            )
        },
        counts={"device": n - 1, "cloud": 0, "rejected": 1, "errors": 0},
        resources=Resources(rss_bytes=61_000_000, cpu_seconds=12.5, model_memory_bytes=410_000),
    )


@dataclass(eq=False)  # hashed by identity (sets of devices to serve)
class Dev:
    """One simulated device."""

    id: str
    client: Any
    sock: Any = None
    connected: bool = False
    next_connect: float = 0.0
    connects: int = 0
    writing: bool = False  # the socket is registered for EVENT_WRITE
    queued: bool = False  # waiting in ``Sim.backlog`` to be read
    wake: float = float("inf")  # the one live timer of this device
    connected_at: float = 0.0
    connect_failures: int = 0
    drops: int = 0  # established connections lost (broker restart, keepalive timeout...)
    # broker restarts: when the connection dropped, the highest seq built by then, and when
    # every one of those seqs was acknowledged (0 while not yet)
    dropped_at: float = 0.0
    seq_at_drop: int = 0
    recovered_at: float = 0.0
    # telemetry
    seq: int = 0  # highest seq put into a batch
    acked: int = 0
    inflight: bytes | None = None
    inflight_last: int = 0
    sent_at: float = 0.0
    next_due: float = 0.0
    resends: int = 0
    timeouts: int = 0  # resends since the last ack that made progress (the agent's backoff)
    wait: float = 0.0  # how long the batch in flight is given for its ack
    bare_unacked: int = 0
    # download
    progress: Progress | None = None
    asked: set[int] = field(default_factory=set)
    unasked: bool = False
    last_request: float = -1e9
    last_block: float = 0.0
    requests: int = 0
    received: int = 0
    bad: int = 0
    done_at: float = 0.0


class Sim:
    """The devices of one worker process and their event loop."""

    def __init__(self, conn: Connection, host: str, port: int, creds: dict[str, Any]) -> None:
        self.conn = conn
        self.host, self.port = host, port
        self.sel = selectors.DefaultSelector()
        self.sel.register(conn, selectors.EVENT_READ, None)
        self.devs: list[Dev] = []
        self.by_client: dict[int, Dev] = {}
        self.mode = "idle"
        self.rng = random.Random()
        for device_id, (ca, cert, key) in creds.items():
            c = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=device_id,
                protocol=MQTTProtocolVersion.MQTTv5,
            )
            c.tls_set(ca, cert, key)
            c.max_inflight_messages_set(100)
            dev = Dev(device_id, c)
            c.user_data_set(dev)
            c.on_connect = self._on_connect
            c.on_message = self._on_message
            c.on_publish = self._on_publish
            self.devs.append(dev)
        self.lags: list[float] = []
        self.sent_batches = 0
        self.sent_items = 0
        self.params: dict[str, Any] = {}
        self.plan: BlockPlan | None = None
        self.bundle = b""
        self.total_blocks = 0
        self.messages = 0
        self.timers: list[tuple[float, int, Dev]] = []
        self.tick = itertools.count()
        self.misc_at = 0
        self.kick: set[Dev] = set()
        self.backlog: deque[Dev] = deque()  # readable devices, oldest first
        self.passes = self.long_passes = 0
        self.max_pass = 0.0
        self.last_download_sweep = self.last_sweep = 0.0
        self.last_misc = time.time()

    # ------------------------------------------------------------------ connections
    def _connect(self, dev: Dev, now: float) -> None:
        """Open the TCP + TLS connection (blocking: paho handshakes in ``reconnect``)."""
        try:
            if dev.connects == 0:
                dev.client.connect(self.host, self.port, keepalive=60, clean_start=True)
            else:
                dev.client.reconnect()
        except OSError:
            dev.connect_failures += 1
            dev.next_connect = now + self.rng.uniform(0.5, 1.5)
            self._schedule(dev, dev.next_connect)
            return
        dev.connects += 1
        dev.sock = dev.client.socket()
        dev.writing = False
        self.sel.register(dev.sock, selectors.EVENT_READ, dev)
        dev.next_connect = float("inf")
        self._flush(dev)

    def _drop(self, dev: Dev, now: float) -> None:
        if dev.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(dev.sock)
            dev.sock = None  # a stale backlog entry reads nothing (``_read``)
        if dev.connected:
            dev.drops += 1
            dev.dropped_at, dev.seq_at_drop, dev.recovered_at = now, dev.seq, 0.0
        dev.connected = dev.writing = False
        dev.next_connect = now + self.rng.uniform(0.2, 1.0)
        self._schedule(dev, dev.next_connect)

    def _on_connect(self, client: Any, dev: Dev, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        dev.connected = True
        dev.connected_at = time.time()
        client.subscribe(
            [
                (f"{PREFIX}/devices/{dev.id}/ack", 1),
                (f"{PREFIX}/devices/{dev.id}/blocks/resp", 1),
                (f"{PREFIX}/broadcast/#", 1),
            ]
        )
        self._check_recovered(dev, dev.connected_at)
        if dev.inflight is not None:
            dev.sent_at = 0.0  # resend the unacknowledged batch at once
        if dev.inflight is not None or self.mode == "telemetry":
            self._schedule(dev, 0.0)  # outside this callback, so paho writes at once

    def _check_recovered(self, dev: Dev, now: float) -> None:
        if dev.dropped_at and not dev.recovered_at and dev.acked >= dev.seq_at_drop:
            dev.recovered_at = now

    # ------------------------------------------------------------------ timers and writes
    def _schedule(self, dev: Dev, when: float) -> None:
        """Wake ``dev`` at ``when`` unless it is already due to wake earlier."""
        if when < dev.wake:
            dev.wake = when
            heapq.heappush(self.timers, (when, next(self.tick), dev))

    def _run_timers(self, now: float) -> None:
        connects = 0
        while self.timers and self.timers[0][0] <= now:
            if connects >= CONNECTS_PER_PASS:  # serve the sockets between reconnect bursts
                return
            when, _n, dev = heapq.heappop(self.timers)
            if when != dev.wake:
                continue  # superseded by an earlier timer
            dev.wake = float("inf")
            if dev.sock is None:
                if now >= dev.next_connect:
                    connects += 1
                    self._connect(dev, now)
                else:
                    self._schedule(dev, dev.next_connect)
            elif self.mode == "telemetry":
                self._maybe_send(dev, now)
                self._flush(dev)

    def _flush(self, dev: Dev) -> None:
        """Write what paho has queued; poll the socket for writing only while bytes remain."""
        c, sock = dev.client, dev.sock
        if sock is None:
            return
        rc = c.loop_write() if c.want_write() else MQTTErrorCode.MQTT_ERR_SUCCESS
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c.socket() is not sock:
            self._drop(dev, time.time())
            return
        want = c.want_write()
        if want != dev.writing:
            dev.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(sock, events, dev)

    # ------------------------------------------------------------------ messages
    def _on_message(self, _client: Any, dev: Dev, msg: Any) -> None:
        now = time.time()
        self.messages += 1
        topic = msg.topic
        if topic.endswith("/ack"):
            self._on_ack(dev, msg.payload, now)
        elif topic == BARE_TOPIC:
            self._on_bare_block(dev, msg.payload, now)
        elif self.plan is not None:
            self._on_block(dev, msg.payload, now)

    def _on_publish(self, _client: Any, dev: Dev, *_a: Any) -> None:
        if self.mode == "flood":
            dev.bare_unacked -= 1
            self.kick.add(dev)  # refilled after this read, outside paho's callback

    def _on_ack(self, dev: Dev, payload: bytes, now: float) -> None:
        try:
            ack = TelemetryAck.from_bytes(payload)
        except EdgefleetError:
            return
        dev.acked = max(dev.acked, ack.upto_seq)
        self._check_recovered(dev, now)
        if dev.inflight is not None and ack.upto_seq >= dev.inflight_last:
            self.lags.append(now - dev.sent_at)
            dev.inflight = None
            dev.timeouts = 0
            if self.mode == "telemetry":
                self._maybe_send(dev, now)

    def _on_block(self, dev: Dev, payload: bytes, now: float) -> None:
        assert self.plan is not None
        if dev.progress is None:
            return
        try:
            block = BlockData.from_bytes(payload, self.plan)
        except EdgefleetError:
            dev.bad += 1
            return
        start, stop = self.plan.block_range(block.index)
        if block.payload != self.bundle[start:stop]:
            dev.bad += 1
            return
        dev.received += 1
        if dev.progress.accept(block.index, len(block.payload)):
            if block.index in dev.asked:
                dev.asked.discard(block.index)
            else:
                dev.unasked = True
            dev.last_block = now
            if dev.progress.complete:
                dev.done_at = now
                dev.asked.clear()

    def _on_bare_block(self, dev: Dev, payload: bytes, now: float) -> None:
        if self.mode != "bare" or dev.done_at:
            return
        size = self.plan.block_size if self.plan else 0
        i = dev.received
        dev.received += 1
        if payload != self.bundle[i * size : (i + 1) * size]:
            dev.bad += 1
        if dev.received == self.total_blocks:
            dev.done_at = now

    # ------------------------------------------------------------------ telemetry
    def _build(self, dev: Dev, now: float) -> None:
        k = self.params["batch"]
        first = dev.seq + 1
        items = tuple(make_report(dev.id, s, now) for s in range(first, first + k))
        dev.inflight = Batch(dev.id, items, floor=first).to_bytes()
        dev.seq = first + k - 1
        dev.inflight_last = dev.seq

    def _maybe_send(self, dev: Dev, now: float) -> None:
        """Send the next batch if due, resend on ack timeout; schedule the next wake-up.

        A disconnected device is woken by ``_on_connect``."""
        p = self.params
        if dev.inflight is not None:
            if not dev.connected:
                return
            if not dev.sent_at:
                self._publish_batch(dev, now)
            elif now - dev.sent_at >= dev.wait:
                dev.resends += 1
                dev.timeouts += 1
                self._publish_batch(dev, now)
            self._schedule(dev, dev.sent_at + dev.wait)
            return
        if now >= p["end"] or not dev.connected:
            return
        if now < dev.next_due:
            self._schedule(dev, dev.next_due)
            return
        self._build(dev, now)
        self.sent_batches += 1
        self.sent_items += p["batch"]
        if p["interval"] > 0:
            dev.next_due = max(dev.next_due + p["interval"], now - p["interval"])
        self._publish_batch(dev, now)
        self._schedule(dev, now + dev.wait)

    def _publish_batch(self, dev: Dev, now: float) -> None:
        """Publish the batch in flight; its ack wait follows the agent's ack-timeout backoff
        (``edge_agent.sync.uplink.ack_wait``; ``ack_timeout_max`` 0: a fixed timeout)."""
        assert dev.inflight is not None
        p = self.params
        dev.sent_at = now
        dev.wait = ack_wait(
            dev.timeouts, p["ack_timeout"], p.get("ack_timeout_max", 0.0), self.rng.random()
        )
        dev.client.publish(f"{PREFIX}/devices/{dev.id}/telemetry", dev.inflight, qos=1)

    def _flood(self, dev: Dev, now: float) -> None:
        """Baseline traffic: the same batches, no acks awaited, ``window`` PUBACKs in flight."""
        p = self.params
        while dev.connected and now < p["end"] and dev.bare_unacked < p["window"]:
            self._build(dev, now)
            payload, dev.inflight = dev.inflight, None
            assert payload is not None
            self.sent_batches += 1
            self.sent_items += p["batch"]
            dev.bare_unacked += 1
            dev.client.publish(f"{PREFIX}/devices/{dev.id}/telemetry", payload, qos=1)

    # ------------------------------------------------------------------ download
    def _due_request(self, dev: Dev, now: float) -> bool:
        """``edge_agent.sync.download.Download.due_request`` with an in-memory ``Progress``."""
        p, progress = self.params, dev.progress
        if progress is None or progress.complete or not dev.connected:
            return False
        if dev.asked:
            if now - max(dev.last_block, dev.last_request) < p["retry"]:
                return False
        elif dev.unasked and now - dev.last_block < p["retry"] / 4:
            return False
        ranges: list[tuple[int, int]] = []
        budget = p["window"]
        for start, stop in progress.missing_ranges(MAX_RANGES):
            take = min(stop - start, budget)
            ranges.append((start, start + take))
            budget -= take
            if budget == 0:
                break
        assert self.plan is not None
        dev.asked = {i for a, b in ranges for i in range(a, b)}
        dev.unasked = False
        dev.last_request = now
        dev.requests += 1
        request = BlockRequest(self.plan.transfer_id, tuple(ranges))
        dev.client.publish(f"{PREFIX}/devices/{dev.id}/blocks/req", request.to_bytes(), qos=1)
        return True

    # ------------------------------------------------------------------ loop
    def _pump(self, timeout: float) -> bool:
        """One bounded pass: poll the sockets (waiting at most ``timeout`` s, not at all while
        readable devices wait), serve writable sockets, read from the backlog for at most
        ``PASS_BUDGET`` s, then due timers, kicked devices and the periodic sweep; True if a
        command is waiting on the pipe."""
        t0 = time.monotonic()
        now = time.time()
        if self.kick or self.backlog:
            timeout = 0.0
        elif self.timers:
            timeout = max(0.0, min(timeout, self.timers[0][0] - now))
        command = False
        for key, ev in self.sel.select(timeout):
            dev = key.data
            if dev is None:
                command = True
            elif ev & selectors.EVENT_READ:
                if not dev.queued:
                    dev.queued = True
                    self.backlog.append(dev)
            else:
                self._flush(dev)
        self._read_backlog(time.monotonic() + PASS_BUDGET)
        now = time.time()
        self._run_timers(now)
        if self.kick:
            kicked, self.kick = self.kick, set()
            for dev in kicked:
                if self.mode == "flood":
                    self._flood(dev, now)
                    self._flush(dev)
        if now - self.last_sweep >= SWEEP_EVERY:
            self.last_sweep = now
            self._sweep(now)
        took = time.monotonic() - t0
        self.passes += 1
        self.max_pass = max(self.max_pass, took)
        if took > 1.0:
            self.long_passes += 1
        return command

    def _read_backlog(self, until: float) -> None:
        """Read the oldest readable devices until ``until`` (at least one device per pass)."""
        for _ in range(len(self.backlog)):
            dev = self.backlog.popleft()
            dev.queued = False
            if self._read(dev):
                dev.queued = True
                self.backlog.append(dev)  # more to read: after the others
            if time.monotonic() >= until:
                return

    def run(self) -> None:
        last_progress = 0.0
        while True:
            if self._pump(SWEEP_EVERY) and not self._command(self.conn.recv()):
                return
            now = time.time()
            if self.mode in ("download", "bare") and now - last_progress >= 0.2:
                last_progress = now
                self.conn.send(
                    (
                        "progress",
                        sum(d.progress.received if d.progress else d.received for d in self.devs),
                    )
                )
                if all(d.done_at for d in self.devs):
                    self._finish_download()

    def _read(self, dev: Dev) -> bool:
        """One ``loop_read`` (one packet); True if TLS still holds bytes the selector cannot see.

        Such a device goes back into the backlog instead of being read to the end now; bytes
        still in the kernel buffer make the selector report the socket again."""
        c = dev.client
        sock = dev.sock
        if sock is None:
            return False
        rc = c.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c.socket() is None:
            self._drop(dev, time.time())
            return False
        self._flush(dev)
        if c.socket() is not sock:
            return False
        try:
            return bool(sock.pending())
        except (OSError, ValueError, AttributeError):
            return False

    def _sweep(self, now: float) -> None:
        """Keepalive for a rotating slice of the devices; the download rule for all of them.

        The slice is sized by the time since the last sweep, not per sweep: while a worker is
        busy with blocking TLS handshakes (a reconnect storm) sweeps are far apart, and a fixed
        slice would leave devices without PINGREQ past 1.5 keepalives, so the broker drops
        them (it did, 12,887 times in a 10,000-device restart, before this)."""
        n = len(self.devs)
        elapsed, self.last_misc = now - self.last_misc, now
        for _ in range(min(n, math.ceil(n * elapsed / MISC_EVERY))):
            dev = self.devs[self.misc_at % n]
            self.misc_at += 1
            if dev.sock is not None:
                if dev.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._drop(dev, now)
                else:
                    self._flush(dev)
        if self.mode == "download" and now - self.last_download_sweep >= DOWNLOAD_SWEEP:
            self.last_download_sweep = now
            for dev in self.devs:
                if dev.sock is not None and self._due_request(dev, now):
                    self._flush(dev)

    # ------------------------------------------------------------------ commands
    def _command(self, cmd: tuple[Any, ...]) -> bool:
        name = cmd[0]
        if name == "connect":
            self._connect_all(cmd[1], cmd[2] if len(cmd) > 2 else 0.0)
        elif name == "stats":
            self.conn.send(("stats", self._stats()))
        elif name in ("telemetry", "flood"):
            self._run_telemetry(name, cmd[1])
        elif name in ("download", "bare"):
            self._start_download(name, cmd[1])
        elif name == "drain":
            self._drain(cmd[1], cmd[2])
        elif name == "finish":
            if self.mode in ("download", "bare"):
                self._finish_download()
        elif name == "stop":
            for dev in self.devs:
                with contextlib.suppress(Exception):
                    dev.client.disconnect()
                    dev.client.loop_write()
            self.conn.send(("stopped",))
            return False
        return True

    def _connect_all(self, timeout: float, rate: float) -> None:
        """Connect every device, at most ``rate`` new connections/s (0: as fast as handshakes
        complete), serving the sockets between handshakes so CONNACKs do not pile up."""
        t0 = time.time()
        for i, dev in enumerate(self.devs):
            due = t0 + i / rate if rate > 0 else 0.0
            while time.time() < due:
                self._pump(min(SWEEP_EVERY, max(0.0, due - time.time())))
            self._connect(dev, time.time())
            self._pump(0.0)
        deadline = t0 + timeout
        while time.time() < deadline and not all(d.connected for d in self.devs):
            self._pump(SWEEP_EVERY)
        end = time.time() + 1.0  # let the SUBACKs arrive
        while time.time() < end:
            self._pump(SWEEP_EVERY)
        self.conn.send(("connected", sum(d.connected for d in self.devs)))

    def _stats(self) -> dict[str, Any]:
        return {
            "connected_at": [d.connected_at for d in self.devs if d.connected],
            "connect_failures": sum(d.connect_failures for d in self.devs),
            "connects": sum(d.connects for d in self.devs),
        }

    def _settled(self) -> bool:
        return all(d.inflight is None and d.connected for d in self.devs)

    def _run_telemetry(self, mode: str, params: dict[str, Any]) -> None:
        self.params = params
        self.lags = []
        self.sent_batches = self.sent_items = 0
        start = params["start"]
        interval = params["interval"]
        for dev in self.devs:
            dev.resends = dev.bare_unacked = dev.drops = dev.timeouts = 0
            dev.dropped_at = dev.recovered_at = 0.0
            dev.next_due = start + (self.rng.uniform(0, interval) if interval > 0 else 0.0)
        while time.time() < start:
            self._pump(max(0.0, min(SWEEP_EVERY, start - time.time())))
        self.mode = mode
        if mode == "telemetry":
            for dev in self.devs:
                self._schedule(dev, dev.next_due)
        else:
            self.kick.update(self.devs)
        drain_until = params["end"] + params["drain"]
        last_check = 0.0
        while True:
            now = time.time()
            if now >= params["end"] and (mode == "flood" or now >= drain_until):
                break
            if now >= params["end"] and now - last_check >= SWEEP_EVERY:
                last_check = now
                if self._settled():
                    break
            self._pump(0.01)
        self.mode = "idle"
        last_seq = {d.id: d.seq for d in self.devs}
        if mode == "flood":  # the baseline's seqs never reach the registry: start again at 1
            for dev in self.devs:
                dev.seq = dev.acked = 0
        dropped = [d for d in self.devs if d.dropped_at]
        self.conn.send(
            (
                "telemetry",
                {
                    "sent_batches": self.sent_batches,
                    "sent_items": self.sent_items,
                    "lags": self.lags,
                    "resends": sum(d.resends for d in self.devs),
                    "unacked": sum(d.inflight is not None for d in self.devs),
                    "last_seq": last_seq,
                    "acked": {d.id: d.acked for d in self.devs},
                    # devices whose connection dropped during the phase (broker restart)
                    "dropped": len(dropped),
                    "drops": sum(d.drops for d in self.devs),
                    "reconnected_at": [d.connected_at for d in dropped if d.connected],
                    "recovered_at": [d.recovered_at for d in dropped if d.recovered_at],
                    "connected": sum(d.connected for d in self.devs),
                },
            )
        )

    def _drain(self, quiet: float, limit: float) -> None:
        """Read until nothing arrived for ``quiet`` s (stale messages still queued for us)."""
        start, seen = time.time(), self.messages
        last, count = start, self.messages
        while time.time() - last < quiet and time.time() - start < limit:
            self._pump(SWEEP_EVERY)
            if self.messages != count:
                count, last = self.messages, time.time()
        self.conn.send(("drained", {"messages": self.messages - seen, "seconds": last - start}))

    def _start_download(self, mode: str, params: dict[str, Any]) -> None:
        self.params = params
        self.plan = BlockPlan(params["length"], params["sha256"], params["block_size"])
        self.total_blocks = self.plan.n_blocks
        self.bundle = Path(params["path"]).read_bytes()
        now = time.time()
        for dev in self.devs:
            dev.progress = Progress(self.plan) if mode == "download" else None
            dev.asked, dev.unasked = set(), False
            dev.last_request, dev.last_block = -1e9, now
            dev.requests = dev.received = dev.bad = 0
            dev.done_at = 0.0
        self.passes = self.long_passes = 0
        self.max_pass = 0.0
        self.mode = mode
        self.conn.send(("ready",))

    def _finish_download(self) -> None:
        self.mode = "idle"
        self.conn.send(
            (
                "downloaded",
                {
                    "done_at": [d.done_at for d in self.devs],
                    "received": sum(d.received for d in self.devs),
                    "requests": sum(d.requests for d in self.devs),
                    "bad": sum(d.bad for d in self.devs),
                    # bare broadcast: no Progress, a device is complete once it had every block
                    "complete": sum(
                        1
                        for d in self.devs
                        if (d.progress.complete if d.progress is not None else d.done_at)
                    ),
                    "connects": sum(d.connects for d in self.devs),
                    # loop health: passes, the longest one (s), passes over 1 s
                    "passes": self.passes,
                    "max_pass_s": self.max_pass,
                    "long_passes": self.long_passes,
                },
            )
        )
        self.plan = None


def worker_main(conn: Connection, host: str, port: int, creds: dict[str, Any]) -> None:
    """Entry point of one worker process."""
    from fleetbench import raise_nofile  # bench/ is on sys.path (spawn copies the parent's)

    raise_nofile()
    sim = Sim(conn, host, port, creds)
    conn.send(("ready",))
    try:
        sim.run()
    finally:
        for dev in sim.devs:
            with contextlib.suppress(Exception):
                dev.client.disconnect()
        conn.close()
