"""Benchmark fleet sync over MQTT: the real Gateway + Registry against bare paho, same run.

Starts a real Mosquitto (TLS, client certificates, fleet ACLs) on a free loopback port, issues
one certificate per simulated device, runs the devices in ``--processes`` worker processes
(``fleetsim``: many paho clients per process in one selector loop) and measures:

A. telemetry ingest: every device sends ``Batch``es of ``--batch`` reports, one in flight,
   first as fast as acks allow (closed loop), then at a fixed offered rate (``--rate`` reports/s
   for the whole fleet). Reports messages/s and reports/s stored (gateway counters), p50/p99
   ingest lag (device send -> ``TelemetryAck``), and checks zero loss / zero duplicates by
   counting rows per device in the registry. Baseline: the same devices flood the same batches
   (QoS 1) at a bare paho shared-subscription consumer that only counts.
B. a ``--bundle-mb`` bundle to every device: ``Gateway.start_wave`` plus each device's windowed
   ``BlockRequest``s (the ``Download`` rule, in-memory ``Progress``, every block compared byte
   for byte). Baseline: bare paho broadcast of the same bytes in 64 KiB QoS 1 messages.
C. B again with the broker restarted when 50% of all blocks have arrived.
R. telemetry at the offered rate with the broker restarted a third of the way into the phase:
   time until every device is connected again and until every batch built before the restart
   is acknowledged ("caught up"), then the same zero loss / zero duplicates check as A.

Before the scenarios it connects the fleet (``--connect-rate`` new TLS connections/s, 0 = as
fast as the workers' blocking handshakes go) and reports the connect rate, the CPU it took and
the memory / threads / file descriptors of Mosquitto and the device workers.
``--interval`` fixes the offered rate per device (one batch every N seconds) instead of for
the fleet, so runs at different fleet sizes offer the same per-device load. ``--json`` writes
every figure to a file.

Usage:
    .venv/bin/python bench/bench_fleet.py [--quick] [--devices 1000] [--processes 4]
        [--duration 20] [--bundle-mb 5] [--scenario a,b,c,r|all] [--interval S]
        [--no-closed] [--connect-rate N] [--connect-timeout S] [--ack-timeout-max S]
        [--drain-limit S] [--json PATH] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.wire.transfer import DEFAULT_BLOCK_SIZE
from fleet_server.config import GatewayConfig
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry.store import Registry
from fleetbench import (
    PREFIX,
    SERVER,
    BareConsumer,
    Broker,
    bare_broadcast,
    device_ids,
    host_load,
    make_pki,
    proc_cpu_seconds,
    proc_status,
    raise_nofile,
)
from fleetsim import BARE_TOPIC, worker_main

WARMUP = 2.0  # seconds excluded from the start of every rate window


class Pool:
    """The worker processes and their pipes."""

    def __init__(self, processes: int, broker: Broker, creds: dict[str, Any], ids: list[str]):
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.progress: dict[int, int] = {}
        for w in range(processes):
            mine = {d: (creds[d].ca, creds[d].cert, creds[d].key) for d in ids[w::processes]}
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(child, broker.host, broker.port, mine), daemon=True
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.gather("ready", 300)  # every worker has built its clients (TLS contexts)

    def send(self, cmd: tuple[Any, ...]) -> None:
        for c in self.conns:
            c.send(cmd)

    def gather(self, kind: str, timeout: float, on_progress: Any = None) -> list[Any]:
        """One ``kind`` reply per worker; ``progress`` messages update ``self.progress``."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers did not answer {kind!r} in {timeout}s")
            for c in wait([c for i, c in enumerate(self.conns) if i not in replies], left):
                assert isinstance(c, Connection)
                msg = c.recv()
                i = self.conns.index(c)
                if msg[0] == "progress":
                    self.progress[i] = msg[1]
                    if on_progress is not None:
                        on_progress(sum(self.progress.values()))
                elif msg[0] == kind:
                    replies[i] = msg[1] if len(msg) > 1 else None
        return [replies[i] for i in range(len(self.conns))]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(p.pid) for p in self.procs if p.pid)

    def status(self) -> dict[str, float]:
        """Summed RSS / threads / fds of the worker processes (``nofile``: the lowest limit)."""
        each = [proc_status(p.pid) for p in self.procs if p.pid]
        out = {k: sum(e[k] for e in each) for k in ("rss_mib", "peak_rss_mib", "threads", "fds")}
        out["nofile"] = min(e["nofile"] for e in each) if each else 0.0
        return out

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


class Server:
    """The system under test: Registry (SQLite, WAL) + Gateway on its own MQTT session."""

    def __init__(self, directory: Path, broker: Broker, ids: list[str]) -> None:
        self.registry = Registry.open(f"sqlite:///{directory / 'registry.db'}")
        self.registry.upgrade()
        for device in ids:
            self.registry.enroll(device, group="bench")
        self.registry_devices = list(ids)
        self.bundles = directory / "bundles"
        self.bundles.mkdir()
        self.broker = broker
        self.gateway: Gateway | None = None
        self.client: MqttClient | None = None

    def start(self) -> Gateway:
        if self.gateway is None:
            creds = self.broker.server
            self.client = MqttClient(
                MqttConfig(
                    host=self.broker.host,
                    port=self.broker.port,
                    device_id=SERVER,
                    ca_path=Path(creds.ca),
                    cert_path=Path(creds.cert),
                    key_path=Path(creds.key),
                    prefix=PREFIX,
                    announce_status=False,
                    clean_start=False,
                    inbox_size=100_000,
                    reconnect_max=1.0,
                )
            )
            self.gateway = Gateway(
                self.registry, self.client, GatewayConfig(prefix=PREFIX, bundles_dir=self.bundles)
            )
            self.gateway.start()
            self.client.connect()
            self.client.wait_connected(10)
            time.sleep(0.5)  # SUBACKs
        return self.gateway

    def stop(self) -> None:
        """Close the gateway's session: a bare client with the same identity (the broker
        forces client id = certificate CN) would otherwise kick it off, and back."""
        if self.gateway is not None:
            self.gateway.close()
        if self.client is not None:
            self.client.close()
        self.gateway = self.client = None

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per named thread of this process (gateway threads), from /proc."""
        out: dict[str, float] = {}
        for t in threading.enumerate():
            if t.native_id is None:
                continue
            out[t.name] = out.get(t.name, 0.0) + proc_cpu_seconds_task(t.native_id)
        return out

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.close()
        if self.client is not None:
            self.client.close()
        self.registry.close()


def telemetry_phase(args: argparse.Namespace, rate: float) -> tuple[float, float, dict[str, Any]]:
    """Start, end and the device workers' parameters of one telemetry phase.

    ``rate`` is the offered reports/s of the whole fleet; 0 means closed loop (as fast as acks
    return). The phase starts half a second from now and lasts ``args.duration``.
    """
    interval = 0.0 if rate <= 0 else args.devices * args.batch / rate
    start = time.time() + 0.5
    end = start + args.duration
    params = {
        "start": start,
        "end": end,
        "batch": args.batch,
        "interval": interval,
        "ack_timeout": 10.0,
        # the agent's [sync] ack_timeout_max_seconds: consecutive timeouts back off
        "ack_timeout_max": getattr(args, "ack_timeout_max", 60.0),
        "drain": 30.0,
    }
    return start, end, params


def offered_rate(args: argparse.Namespace) -> float:
    """Offered reports/s of the whole fleet: ``--interval`` per device, else ``--rate``."""
    if args.interval > 0:
        return float(args.devices * args.batch / args.interval)
    return float(args.rate)


def proc_cpu_seconds_task(tid: int) -> float:
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --------------------------------------------------------------------------- connect
def connect_fleet(args: Any, pool: Pool, broker: Broker) -> dict[str, Any]:
    """Connect every device (ramped), then the connect rate, CPU, memory and fds."""
    m0, w0 = broker.cpu_seconds(), pool.cpu_seconds()
    t0 = time.time()
    pool.send(("connect", args.connect_timeout, args.connect_rate / args.processes))
    connected = sum(pool.gather("connected", args.connect_timeout + 300))
    t1 = time.time()
    m1, w1 = broker.cpu_seconds(), pool.cpu_seconds()
    pool.send(("stats",))
    stats = pool.gather("stats", 60)
    at = sorted(x - t0 for s in stats for x in s["connected_at"])
    last = at[-1] if at else float("nan")
    return {
        "connected": connected,
        "seconds": last,
        "per_s": connected / last if at and last > 0 else 0.0,
        "p50_s": pct(at, 0.5),
        "p99_s": pct(at, 0.99),
        "command_seconds": t1 - t0,
        "failures": sum(s["connect_failures"] for s in stats),
        "mosquitto_cpu_s": m1 - m0,
        "workers_cpu_s": w1 - w0,
        "mosquitto": proc_status(broker.pid) if broker.pid else {},
        "workers": pool.status(),
        "bench": proc_status(os.getpid()),
    }


# --------------------------------------------------------------------------- scenario A
def scenario_a(args: Any, pool: Pool, server: Server, broker: Broker) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # Baseline: bare QoS 1 consumer, no database, same batches flooded by the same devices.
    consumer = BareConsumer(broker, f"$share/bare/{PREFIX}/devices/+/telemetry")
    start = time.time() + 0.5
    end = start + args.duration
    params = {
        "start": start,
        "end": end,
        "batch": args.batch,
        "window": 2,
        "drain": 0,
        "interval": 0.0,
    }
    pool.send(("flood", params))
    time.sleep(max(0.0, start + WARMUP - time.time()))
    c0, t0, m0 = consumer.count, time.monotonic(), broker.cpu_seconds()
    time.sleep(max(0.0, end - time.time()))
    c1, t1, m1 = consumer.count, time.monotonic(), broker.cpu_seconds()
    sent = pool.gather("telemetry", 60)
    consumer.close()
    res["bare_msgs_s"] = (c1 - c0) / (t1 - t0)
    res["bare_items_s"] = res["bare_msgs_s"] * args.batch
    res["bare_offered_msgs_s"] = sum(s["sent_batches"] for s in sent) / args.duration
    res["bare_mosquitto_cpu"] = (m1 - m0) / (t1 - t0)
    time.sleep(1.0)

    gateway = server.start()
    base = sum(s["sent_items"] for s in sent)  # flood seqs are not in the DB
    floor_seq = dict.fromkeys(server.registry_devices, 0)
    phases = [("closed", 0.0)] if args.closed else []
    for phase, rate in [*phases, ("rate", offered_rate(args))]:
        start, end, params = telemetry_phase(args, rate)
        # Wait up to --timeout for the last acks, so the check below does not count batches
        # still in flight (resent after an ack timeout) as lost.
        params["drain"] = max(params["drain"], args.timeout)
        pool.send(("telemetry", params))
        time.sleep(max(0.0, start + WARMUP - time.time()))
        s0, t0 = gateway.stats(), time.monotonic()
        cpu0, m0, w0 = server.thread_cpu(), broker.cpu_seconds(), pool.cpu_seconds()
        time.sleep(max(0.0, end - time.time()))
        s1, t1 = gateway.stats(), time.monotonic()
        cpu1, m1, w1 = server.thread_cpu(), broker.cpu_seconds(), pool.cpu_seconds()
        out = pool.gather("telemetry", 120)
        span = t1 - t0
        lags = [x for o in out for x in o["lags"]]
        r = {
            "msgs_s": (s1.acks_sent - s0.acks_sent) / span,
            "items_s": (s1.items_inserted - s0.items_inserted) / span,
            "offered_items_s": sum(o["sent_items"] for o in out) / args.duration,
            "lag_p50": pct(lags, 0.50),
            "lag_p99": pct(lags, 0.99),
            "lag_max": max(lags) if lags else float("nan"),
            "resends": sum(o["resends"] for o in out),
            "unacked": sum(o["unacked"] for o in out),
            "mosquitto_cpu": (m1 - m0) / span,
            "workers_cpu": (w1 - w0) / span,
            "threads_cpu": {k: (cpu1.get(k, 0) - cpu0.get(k, 0)) / span for k in cpu1},
            "pending_max": s1.ingest_pending,
        }
        res[phase] = r
        last_seq = {d: v for o in out for d, v in o["last_seq"].items()}
    res["check"] = check_rows(server, gateway, last_seq, floor_seq)
    res["check"]["flood_items_not_stored"] = base
    return res


def check_rows(
    server: Server, gateway: Gateway, last_seq: dict[str, int], floor_seq: dict[str, int]
) -> dict[str, Any]:
    """Zero loss / zero duplicates: rows per device vs the seqs ``floor+1 .. last`` sent."""
    time.sleep(0.5)
    with server.registry.engine.connect() as conn:
        rows = {
            d: (n, nd, lo, hi)
            for d, n, nd, lo, hi in conn.execute(
                text(
                    "SELECT device_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq)"
                    " FROM telemetry GROUP BY device_id"
                )
            )
        }
    expected = {d: last_seq[d] - floor_seq[d] for d in last_seq}
    stored = sum(r[0] for r in rows.values())
    bad = [
        d
        for d, n in expected.items()
        if n and rows.get(d, (0, 0, 0, 0)) != (n, n, floor_seq[d] + 1, last_seq[d])
    ]
    st = gateway.stats()
    return {
        "expected_rows": sum(expected.values()),
        "stored_rows": stored,
        "devices_mismatch": len(bad),
        "duplicate_rows": sum(r[0] - r[1] for r in rows.values()),
        "server_duplicates": st.duplicates,
        "server_lost": st.lost,
        "rejected": dict(st.rejected),
    }


# --------------------------------------------------------------------------- scenario R
def scenario_r(args: Any, pool: Pool, server: Server, broker: Broker) -> dict[str, Any]:
    """Telemetry at the offered rate; the broker restarts a third of the way into the phase."""
    gateway = server.start()
    start, _end, params = telemetry_phase(args, offered_rate(args))
    params["drain"] = args.timeout  # how long the devices may take to catch up after the end
    pool.send(("telemetry", params))
    time.sleep(max(0.0, start + args.duration / 3 - time.time()))
    s0, m_old, w0 = gateway.stats(), broker.cpu_seconds(), pool.cpu_seconds()
    t_down = time.time()
    broker.restart()
    t_up = time.time()
    out = pool.gather("telemetry", args.duration + args.timeout + 120)
    t_end = time.time()
    s1, m_new, w1 = gateway.stats(), broker.cpu_seconds(), pool.cpu_seconds()
    reconnected = sorted(x for o in out for x in o["reconnected_at"])
    recovered = sorted(x for o in out for x in o["recovered_at"])
    dropped = sum(o["dropped"] for o in out)
    lags = [x for o in out for x in o["lags"]]
    all_back = reconnected[-1] - t_up if len(reconnected) == dropped and dropped else float("nan")
    res: dict[str, Any] = {
        "devices": args.devices,
        "offered_items_s": offered_rate(args),
        "broker_down_s": t_up - t_down,
        "mosquitto_cpu_before_s": m_old,
        "dropped": dropped,
        "drops": sum(o.get("drops", 0) for o in out),
        "reconnected": len(reconnected),
        "reconnect_p50_s": statistics.median(reconnected) - t_up if reconnected else float("nan"),
        "all_reconnected_s": all_back,
        "reconnects_per_s": dropped / all_back if all_back == all_back and all_back else 0.0,
        "recovered": len(recovered),
        "caught_up_s": (
            recovered[-1] - t_up if len(recovered) == dropped and dropped else float("nan")
        ),
        "lag_p50": pct(lags, 0.50),
        "lag_p99": pct(lags, 0.99),
        "lag_max": max(lags) if lags else float("nan"),
        "resends": sum(o["resends"] for o in out),
        "unacked": sum(o["unacked"] for o in out),
        "connected_at_end": sum(o["connected"] for o in out),
        "phase_seconds": t_end - start,
        "items_stored": s1.items_inserted - s0.items_inserted,
        "server_duplicates_during": s1.duplicates - s0.duplicates,
        "mosquitto_cpu_after_s": m_new,
        "workers_cpu_s": w1 - w0,
        "mosquitto": proc_status(broker.pid) if broker.pid else {},
    }
    last_seq = {d: v for o in out for d, v in o["last_seq"].items()}
    res["check"] = check_rows(server, gateway, last_seq, dict.fromkeys(last_seq, 0))
    return res


# --------------------------------------------------------------------------- scenarios B/C
def make_bundle(server: Server, mb: float, version: int) -> dict[str, Any]:
    data = random.Random(version).randbytes(int(mb * 1024 * 1024))
    sha = hashlib.sha256(data).hexdigest()
    path = server.bundles / f"{sha}.bundle"
    path.write_bytes(data)
    server.registry.publish_bundle(
        "bench",
        version,
        channel="stable",
        sha256=sha,
        length=len(data),
        targets_sha256=hashlib.sha256(b"targets-%d" % version).hexdigest(),
    )
    return {
        "path": str(path),
        "sha256": sha,
        "length": len(data),
        "block_size": DEFAULT_BLOCK_SIZE,
        "window": 16,
        "retry": 2.0,
        "data": data,
    }


def _downloaded(out: list[Any], t0: float, devices: int) -> dict[str, Any]:
    """Sum the workers' ``downloaded`` replies; ``seconds`` is NaN unless every device
    finished. The workers' loop health is the worst worker's."""
    done = [x for o in out for x in o["done_at"]]
    complete = sum(o["complete"] for o in out)
    return {
        "max_pass_s": max(o["max_pass_s"] for o in out),
        "long_passes": sum(o["long_passes"] for o in out),
        "passes": sum(o["passes"] for o in out),
        "seconds": (max(done) - t0) if complete == devices else float("nan"),
        "p50_seconds": statistics.median(x - t0 for x in done if x) if any(done) else float("nan"),
        "complete": complete,
        "received": sum(o["received"] for o in out),
        "requests": sum(o["requests"] for o in out),
        "bad": sum(o["bad"] for o in out),
    }


def bare_bundle(
    args: Any, pool: Pool, server: Server, broker: Broker, bundle: dict[str, Any]
) -> dict[str, Any]:
    server.stop()
    params = {k: v for k, v in bundle.items() if k != "data"}
    pool.send(("bare", params))
    pool.gather("ready", 60)
    size = bundle["block_size"]
    data = bundle["data"]
    blocks = [data[i : i + size] for i in range(0, len(data), size)]
    m0, w0 = broker.cpu_seconds(), pool.cpu_seconds()
    t0 = time.time()
    threading.Thread(target=bare_broadcast, args=(broker, BARE_TOPIC, blocks), daemon=True).start()
    timed_out = False
    try:
        out = pool.gather("downloaded", args.timeout)
    except TimeoutError:
        timed_out = True
        pool.send(("finish",))
        out = pool.gather("downloaded", 60)
    r = _downloaded(out, t0, args.devices)
    r["mosquitto_cpu_s"] = broker.cpu_seconds() - m0
    r["workers_cpu_s"] = pool.cpu_seconds() - w0
    r["timed_out"] = timed_out
    r["workers"] = pool.status()
    r["mosquitto"] = proc_status(broker.pid) if broker.pid else {}
    return r


def system_bundle(
    args: Any, pool: Pool, server: Server, broker: Broker, bundle: dict[str, Any], restart: bool
) -> dict[str, Any]:
    gateway = server.start()
    params = {k: v for k, v in bundle.items() if k != "data"}
    n_blocks = -(-bundle["length"] // bundle["block_size"])
    pool.send(("download", params))
    pool.gather("ready", 60)
    pool.progress.clear()
    s0 = gateway.stats()
    m0, w0 = broker.cpu_seconds(), pool.cpu_seconds()
    restarted: dict[str, float] = {}

    def on_progress(total: int) -> None:
        frac = total / (args.devices * n_blocks)
        if restart and not restarted and frac >= 0.5:
            restarted["at_fraction"] = frac
            restarted["at_seconds"] = time.time() - t0
            m = broker.cpu_seconds()
            t = time.monotonic()
            broker.restart()
            restarted["restart_seconds"] = time.monotonic() - t
            restarted["cpu_before"] = m

    t0 = time.time()
    gateway.start_wave(bundle["sha256"])
    timed_out = False
    try:
        out = pool.gather("downloaded", args.timeout, on_progress)
    except TimeoutError:
        timed_out = True
        pool.send(("finish",))
        out = pool.gather("downloaded", 60)
    s1 = gateway.stats()
    r = _downloaded(out, t0, args.devices)
    r["workers_cpu_s"] = pool.cpu_seconds() - w0
    r["timed_out"] = timed_out
    r["workers"] = pool.status()
    r["mosquitto"] = proc_status(broker.pid) if broker.pid else {}
    # Blocks still queued in the broker for devices that are already complete arrive later
    # (and would land in the next transfer): count them and let them drain.
    pool.send(("drain", 3.0, args.drain_limit))
    drained = pool.gather("drained", args.drain_limit + 60)
    r["stale_after_done"] = sum(d["messages"] for d in drained)
    r["drain_seconds"] = max(d["seconds"] for d in drained)
    r["blocks_broadcast"] = s1.blocks_broadcast - s0.blocks_broadcast
    r["blocks_unicast"] = s1.blocks_unicast - s0.blocks_unicast
    r["block_requests_served"] = s1.block_requests - s0.block_requests
    r["n_blocks"] = n_blocks
    r["mosquitto_cpu_s"] = (
        broker.cpu_seconds() - m0
        if not restarted
        else restarted["cpu_before"] - m0 + broker.cpu_seconds()
    )
    r["restart"] = restarted
    return r


# --------------------------------------------------------------------------- report
def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def table(args: Any, res: dict[str, Any]) -> str:
    lines = [
        "| Scenario | Metric | edgefleet | bare paho | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]

    def row(s: str, m: str, ours: str, bare: str, ratio: str, target: str, met: str) -> None:
        lines.append(f"| {s} | {m} | {ours} | {bare} | {ratio} | {target} | {met} |")

    if "connect" in res:
        c = res["connect"]
        mq, wk = c["mosquitto"], c["workers"]
        row(
            f"Connect {args.devices} TLS devices",
            "time to all connected (s), p50 (s), rate (/s), failed attempts",
            f"{fmt(c['seconds'])}, {fmt(c['p50_s'])}, {fmt(c['per_s'], 0)}, {c['failures']}",
            "",
            "",
            "",
            "",
        )
        row(
            "Connect",
            "CPU while connecting (s): mosquitto / device workers",
            f"{fmt(c['mosquitto_cpu_s'])} / {fmt(c['workers_cpu_s'])}",
            "",
            "",
            "",
            "",
        )
        row(
            "Connect",
            "mosquitto RSS MiB / fds (limit); workers RSS MiB / threads / fds",
            f"{fmt(mq.get('rss_mib', 0), 0)} / {fmt(mq.get('fds', 0), 0)} "
            f"({fmt(mq.get('nofile', 0), 0)}); {fmt(wk['rss_mib'], 0)} / "
            f"{fmt(wk['threads'], 0)} / {fmt(wk['fds'], 0)}",
            "",
            "",
            "",
            "",
        )
    if "a" in res:
        a = res["a"]
        bare_m, bare_i = a["bare_msgs_s"], a["bare_items_s"]
        for phase in [ph for ph in ("closed", "rate") if ph in a]:
            p = a[phase]
            offered = f"A offered {fmt(offered_rate(args), 0)}/s"
            label = "A closed loop" if phase == "closed" else offered
            row(
                label,
                f"reports/s into DB ({args.batch}/msg)",
                fmt(p["items_s"], 0),
                fmt(bare_i, 0),
                f"{p['items_s'] / bare_i:.2f}",
                ">= 3,000",
                "yes" if p["items_s"] >= 3000 else "no",
            )
            row(
                label,
                "MQTT msgs/s into DB",
                fmt(p["msgs_s"], 0),
                fmt(bare_m, 0),
                f"{p['msgs_s'] / bare_m:.2f}",
                "",
                "",
            )
            row(
                label,
                "ingest lag p50 / p99 / max (s)",
                f"{fmt(p['lag_p50'], 3)} / {fmt(p['lag_p99'], 3)} / {fmt(p['lag_max'], 2)}",
                "",
                "",
                "p99 < 1 s",
                "yes" if p["lag_p99"] < 1.0 else "no",
            )
            row(
                label,
                "CPU (cores): mosquitto / device workers",
                f"{p['mosquitto_cpu']:.2f} / {p['workers_cpu']:.2f}",
                f"{a['bare_mosquitto_cpu']:.2f} / -",
                "",
                "",
                "",
            )
            th = p["threads_cpu"]
            row(
                label,
                "gateway CPU (cores): ingest / mqtt-net / handlers",
                f"{th.get('fleet-ingest', 0):.2f} / {th.get('mqtt-network', 0):.2f} / "
                f"{th.get('mqtt-handlers', 0):.2f}",
                "",
                "",
                "",
                "",
            )
        c = a["check"]
        ok = (
            c["stored_rows"] == c["expected_rows"]
            and c["devices_mismatch"] == 0
            and c["duplicate_rows"] == 0
        )
        row(
            "A check",
            "rows stored / seqs sent (mismatched devices, dup rows)",
            f"{c['stored_rows']:,} / {c['expected_rows']:,} ({c['devices_mismatch']}, "
            f"{c['duplicate_rows']})",
            "",
            "",
            "0 lost, 0 dup",
            "yes" if ok else "no",
        )
    if "r" in res:
        r = res["r"]
        cr = r["check"]
        ok = (
            cr["stored_rows"] == cr["expected_rows"]
            and cr["devices_mismatch"] == 0
            and cr["duplicate_rows"] == 0
        )
        row(
            f"R broker restart, offered {fmt(r['offered_items_s'], 0)}/s",
            "broker down (s); devices dropped / reconnected (connections lost)",
            f"{fmt(r['broker_down_s'], 2)}; {r['dropped']} / {r['reconnected']} ({r['drops']})",
            "",
            "",
            "",
            "",
        )
        row(
            "R",
            "all reconnected (s after broker up), p50 (s), reconnects/s",
            f"{fmt(r['all_reconnected_s'])}, {fmt(r['reconnect_p50_s'])}, "
            f"{fmt(r['reconnects_per_s'], 0)}",
            "",
            "",
            "",
            "",
        )
        row(
            "R",
            "telemetry caught up (s after broker up); devices caught up",
            f"{fmt(r['caught_up_s'])}; {r['recovered']}",
            "",
            "",
            "",
            "",
        )
        row(
            "R",
            "ingest lag over the phase p50 / p99 / max (s); resends",
            f"{fmt(r['lag_p50'], 3)} / {fmt(r['lag_p99'], 3)} / {fmt(r['lag_max'], 2)}; "
            f"{r['resends']}",
            "",
            "",
            "",
            "",
        )
        row(
            "R check",
            "rows stored / seqs sent (mismatched devices, dup rows)",
            f"{cr['stored_rows']:,} / {cr['expected_rows']:,} ({cr['devices_mismatch']}, "
            f"{cr['duplicate_rows']})",
            "",
            "",
            "0 lost, 0 dup",
            "yes" if ok else "no",
        )
    if "b" in res:
        nan = float("nan")
        no_bare = {
            "seconds": nan,
            "complete": "-",
            "bad": "-",
            "received": 0,
            "mosquitto_cpu_s": nan,
        }
        b, bare = res["b"], res.get("b_bare", no_bare)
        row(
            f"B {fmt(args.bundle_mb, 0)} MB bundle",
            f"time to all {args.devices} devices (s)",
            fmt(b["seconds"]),
            fmt(bare["seconds"]),
            f"{b['seconds'] / bare['seconds']:.2f}",
            "<= 40 s",
            "yes" if b["seconds"] <= 40 else "no",
        )
        row(
            "B",
            "devices complete (byte-exact), bad blocks",
            f"{b['complete']}, {b['bad']}",
            f"{bare['complete']}, {bare['bad']}",
            "",
            "",
            "",
        )
        row(
            "B",
            "blocks delivered to devices / needed",
            f"{b['received']:,} / {args.devices * b['n_blocks']:,}",
            f"{bare['received']:,}",
            "",
            "",
            "",
        )
        row(
            "B",
            "server blocks published: broadcast / unicast (requests)",
            f"{b['blocks_broadcast']} / {b['blocks_unicast']} ({b['requests']})",
            str(b["n_blocks"]),
            "",
            "",
            "",
        )
        row(
            "B",
            "stale blocks delivered after all complete (drain s)",
            f"{b['stale_after_done']:,} ({fmt(b['drain_seconds'])})",
            "",
            "",
            "",
            "",
        )
        row(
            "B",
            "mosquitto CPU (s)",
            fmt(b["mosquitto_cpu_s"]),
            fmt(bare["mosquitto_cpu_s"]),
            "",
            "",
            "",
        )
    if "c" in res:
        c, b = res["c"], res.get("b")
        rs = c["restart"]
        if rs and rs.get("at_seconds", 0) > c["seconds"]:
            lines.append(
                "| C | NOTE: every device was complete before the restart |  |  |  |  |  |"
            )
        extra = c["seconds"] - b["seconds"] if b else float("nan")
        row(
            "C restart at 50%",
            "time to all devices (s) / extra vs B",
            f"{fmt(c['seconds'])} / +{fmt(extra)}",
            "",
            "",
            "",
            "",
        )
        row(
            "C",
            "restart at (blocks fraction, s after start, broker down s)",
            f"{rs.get('at_fraction', float('nan')):.2f}, "
            f"{fmt(rs.get('at_seconds', float('nan')))}, "
            f"{fmt(rs.get('restart_seconds', float('nan')), 2)}",
            "",
            "",
            "",
            "",
        )
        eb = (c["blocks_broadcast"] + c["blocks_unicast"]) - (
            (b["blocks_broadcast"] + b["blocks_unicast"]) if b else 0
        )
        ed = c["received"] - (b["received"] if b else 0)
        row(
            "C",
            "server blocks published: broadcast / unicast (extra vs B)",
            f"{c['blocks_broadcast']} / {c['blocks_unicast']} (+{eb})",
            "",
            "",
            "",
            "",
        )
        row(
            "C",
            "blocks delivered to devices (extra vs B), complete",
            f"{c['received']:,} (+{ed:,}), {c['complete']}",
            "",
            "",
            "",
            "",
        )
    return "\n".join(lines)


def save(args: Any, res: dict[str, Any]) -> None:
    """Write the figures so far to ``--json`` (after every scenario: a long run that fails
    later keeps what it measured), with the host's load at that moment."""
    done = [k for k in res if k != "host"]
    res.setdefault("host", []).append(host_load() | {"after": done[-1] if done else ""})
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **res}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per telemetry phase")
    ap.add_argument("--rate", type=float, default=3000.0, help="offered reports/s (phase 2)")
    ap.add_argument("--batch", type=int, default=5, help="reports per telemetry message")
    ap.add_argument("--bundle-mb", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=180.0, help="bundle delivery timeout (s)")
    ap.add_argument(
        "--scenario", default="all", help="comma-separated subset of a,r,b,c, or all (a,r,b,c)"
    )
    ap.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between two batches of one device (overrides --rate: fixed per device)",
    )
    ap.add_argument(
        "--no-closed", dest="closed", action="store_false", help="skip A's closed-loop phase"
    )
    ap.add_argument(
        "--connect-rate", type=float, default=0.0, help="new connections/s, fleet (0: no cap)"
    )
    ap.add_argument(
        "--ack-timeout-max",
        type=float,
        default=60.0,
        help="devices' ack-timeout backoff cap, s (the agent's default; 0: fixed 10 s timeout)",
    )
    ap.add_argument(
        "--connect-timeout", type=float, default=600.0, help="seconds to connect every device"
    )
    ap.add_argument(
        "--drain-limit",
        type=float,
        default=300.0,
        help="seconds B waits at most for stale blocks after every device is complete",
    )
    ap.add_argument(
        "--no-bare-bundle",
        dest="bare_bundle",
        action="store_false",
        help="skip B's bare broadcast baseline (it moves the same bytes again)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    ap.add_argument("--quick", action="store_true", help="50 devices, 1 MB, 5 s phases")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    wanted = {"a", "r", "b", "c"} if args.scenario == "all" else set(args.scenario.split(","))
    if not wanted or wanted - {"a", "r", "b", "c"}:
        ap.error(f"--scenario: unknown {args.scenario!r}")
    if args.quick:
        args.devices, args.processes, args.duration = 50, 2, 5.0
        args.bundle_mb, args.rate, args.timeout = 1.0, 500.0, 60.0
    nofile = raise_nofile()
    # SIGTERM unwinds like Ctrl-C: the finally below stops Mosquitto and removes the temp dir
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="fleetbench-"))
    print(
        f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} python "
        f"{platform.python_version()} nofile={nofile} devices={args.devices} "
        f"processes={args.processes} dir={root}",
        file=sys.stderr,
    )
    res: dict[str, Any] = {}
    broker = server = pool = None
    try:
        t = time.monotonic()
        ids = device_ids(args.devices)
        ca, creds = make_pki(root / "pki", ids)
        broker = Broker.create(root, ca, creds[SERVER])
        broker.start()
        server = Server(root, broker, ids)
        print(f"# setup (PKI, broker, registry) {time.monotonic() - t:.1f}s", file=sys.stderr)
        t = time.monotonic()
        pool = Pool(args.processes, broker, creds, ids)
        print(f"# workers started in {time.monotonic() - t:.1f}s", file=sys.stderr)
        res["connect"] = connect_fleet(args, pool, broker)
        print(f"# connect: {res['connect']}", file=sys.stderr)
        save(args, res)
        connected = res["connect"]["connected"]
        if connected != args.devices:
            raise RuntimeError(f"only {connected} of {args.devices} devices connected")
        if "a" in wanted:
            res["a"] = scenario_a(args, pool, server, broker)
            print(f"# A: {res['a']}", file=sys.stderr)
            save(args, res)
        if "r" in wanted:
            res["r"] = scenario_r(args, pool, server, broker)
            print(f"# R: {res['r']}", file=sys.stderr)
            save(args, res)
        if wanted & {"b", "c"}:
            bundle = make_bundle(server, args.bundle_mb, 1)
            # C is reported against B of the same run, so it runs B first.
            if args.bare_bundle:
                res["b_bare"] = bare_bundle(args, pool, server, broker, bundle)
                print(f"# B bare: {res['b_bare']}", file=sys.stderr)
                save(args, res)
            res["b"] = system_bundle(args, pool, server, broker, bundle, restart=False)
            print(f"# B: {res['b']}", file=sys.stderr)
            save(args, res)
            if "c" in wanted:
                bundle2 = make_bundle(server, args.bundle_mb, 2)
                res["c"] = system_bundle(args, pool, server, broker, bundle2, restart=True)
                print(f"# C: {res['c']}", file=sys.stderr)
                save(args, res)
    finally:
        if pool is not None:
            pool.close()
        if server is not None:
            server.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    save(args, res)
    out = table(args, res)
    print(out if args.markdown else out.replace("|", " ").strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
