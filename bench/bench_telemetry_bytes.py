"""Measure what telemetry costs on a device's link: bytes per message and per device per day.

Builds real reports the way the agent does: the digits MLP from the project's own builder
(``model_builder.examples.digits_mlp``, quantized, signed), installed in a real ``Agent`` with
the drift and sync settings of the example config (``deploy/agent.example.toml``: drift windows
of ``window_values`` rows or ``window_seconds``, one report per ``report_interval_seconds``),
real digits rows through the real pipeline (so real tier-A windows close), a report built every
interval by ``report_from_status`` from ``Agent.status()`` and the closed windows, wrapped in the
``Batch`` the uplink publishes. Time is simulated (the agent's clock is real elapsed time plus the
simulated gaps between requests, so latencies are real); four traffic levels: idle, 1, 10 and
50 requests per second (one row each).

Every level runs twice: with the config's drift window budget (``[drift] windows_per_hour``,
``window_burst``: windows grow with traffic, their number per day is bounded) and with fixed
windows (the same config with ``windows_per_hour = 0``); the last table compares the two.

Each message is encoded as:

- ``json``: today's canonical JSON (drift views as base64 of ``TierAView.to_bytes``, ``EFTA``);
- ``json+zlib``: the same, DEFLATE level 9 (zlib is in the stdlib; zstd is not a dependency);
- ``json, packed views``: JSON with each view as base64 of the packed view
  (``edge_agent.wire.compact.pack_view``), without and with zlib;
- ``binary``: the JSON without views plus the packed views as bytes (the body of ``packed-1``),
  without compression;
- ``packed-1``: the wire form agents send to servers that accept it
  (``edge_agent.wire.compact.pack_message``: that body, raw DEFLATE with a preset dictionary);
- ``packed-1, k reports``: one message every k report intervals holding k reports (what a
  longer send interval would cost: edges and keys repeat inside one DEFLATE stream);
- ``packed-1, coalesced``: the messages the uplink sends with the config's
  ``[sync] report_coalesce_seconds``, replayed with its own rule (``sync.coalesce``: plain
  reports wait up to that long to share a message, urgent ones leave at once).

Each level is measured after a warm-up of the same traffic (``--warmup``, 15 simulated minutes):
a fresh agent's window budget starts with ``window_burst`` windows of credit, which a day
spends once. Per day = mean bytes per message x messages per day (86,400 / report interval).
Payload bytes
only: MQTT fixed header, topic (about 40 bytes) and TLS records come on top of every message,
and the server's acks travel the other way.

Usage:
    .venv/bin/python bench/bench_telemetry_bytes.py [--minutes 30] [--warmup 15] [--config CONFIG]
        [--report-interval SECONDS] [--window-seconds SECONDS] [--window-values ROWS]

``--config`` defaults to ``deploy/agent.example.toml``; the other options override its
``[sync] report_interval_seconds`` and ``[drift] window_seconds`` / ``window_values``.

Runtime: about 3 minutes on 2 cores (mostly 50 req/s of simulated traffic, twice).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig, StoreConfig, load_config
from edge_agent.drift import TierAView
from edge_agent.runtime.device import detect_device_profile
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from edge_agent.sync.coalesce import CoalescePolicy
from edge_agent.sync.telemetry_feed import process_resources
from edge_agent.trust import TrustedRoot
from edge_agent.wire.compact import pack_message, pack_view, unpack_message
from edge_agent.wire.telemetry import Batch, TelemetryAck, TelemetryReport, report_from_status
from fleet_server.gateway.ingest_parse import ACCEPTED_ENCODINGS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_agent
DEVICE_ID = "gateway-0001"
LEVELS = (("idle", 0.0), ("1 req/s", 1.0), ("10 req/s", 10.0), ("50 req/s", 50.0))
PACKED = "packed-1 (binary+deflate+dict)"
COALESCED = "packed-1, coalesced as configured"
MESSAGES = "messages"
BATCHED = (4, 10)
BATCH_BYTES = 192 * 1024  # Uplink's default max_bytes


def build_bundle(work: Path) -> tuple[Path, TrustedRoot, np.ndarray]:
    """The digits MLP trained, quantized and signed as ``bench_agent`` builds it; returns
    (bundle, trusted root, eval inputs)."""
    from bench_agent import build_bundle as build

    bundle, root, rows = build(work)
    return bundle, TrustedRoot.from_bytes(root.read_bytes()), rows


class SimClock:
    """Real elapsed time (so the pipeline measures real latencies) plus simulated gaps."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self.offset = 1000.0

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self._t0


def simulate(
    example: AgentConfig,
    bundle: Path,
    root: Any,
    rows: np.ndarray,
    rate: float,
    minutes: float,
    warmup: float = 0.0,
) -> list[TelemetryReport]:
    """Reports of one device serving ``rate`` requests/s for ``minutes`` (simulated), after
    ``warmup`` minutes of the same traffic whose reports are left out (a fresh agent's window
    budget starts full: the steady state is what a day costs)."""
    interval = example.sync.report_interval_seconds
    with tempfile.TemporaryDirectory() as tmp:
        config = AgentConfig(
            store=StoreConfig(state_dir=tmp),
            drift=example.drift,
            model_defaults=example.model_defaults,
        )
        clock = SimClock()
        store = ModelStore(Path(tmp), root, detect_device_profile())
        agent = Agent(config, store, clock=clock, background_drift=False)
        agent.install(bundle)
        agent.start()
        rng = np.random.default_rng(20261207)
        wall0 = 1_796_000_000.0
        reports: list[TelemetryReport] = []
        window_start = wall0
        per_report = round(rate * interval)
        skip = int(warmup * 60 / interval)
        for i in range(skip + int(minutes * 60 / interval)):
            for _ in range(per_report):
                clock.offset += 1.0 / rate
                j = int(rng.integers(len(rows)))
                agent.infer(InferenceRequest("digits", {"input": rows[j : j + 1]}))
            if not per_report:
                clock.offset += interval
            agent.tick()
            windows = agent.drift_windows.drain()
            now = wall0 + (i + 1) * interval
            report = report_from_status(
                DEVICE_ID,
                i + 1,
                agent.status(),
                windows,
                now,
                window_start=window_start,
                resources=process_resources(agent.registry.memory_used()),
            )
            if i >= skip:
                reports.append(report)
            window_start = now
        agent.close()
    return reports


def _views_packed(doc: dict[str, Any], as_base64: bool) -> tuple[dict[str, Any], list[bytes]]:
    """``doc`` with every drift view packed: base64 in place, or an index plus the bytes."""
    out: list[bytes] = []
    for item in doc["items"]:
        for model in item.get("models", {}).values():
            for window in model["drift"]:
                packed = pack_view(TierAView.from_bytes(base64.b64decode(window["view"])))
                window["view"] = base64.b64encode(packed).decode() if as_base64 else len(out)
                out.append(packed)
    return doc, out


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encodings(message: bytes) -> dict[str, int]:
    """Bytes of one JSON batch message under every candidate encoding."""
    z = zlib.compress
    b64_doc, _ = _views_packed(json.loads(message), as_base64=True)
    b64 = _dumps(b64_doc)
    idx_doc, views = _views_packed(json.loads(message), as_base64=False)
    binary = len(_dumps(idx_doc)) + sum(len(v) + 2 for v in views)
    packed = pack_message(message)
    assert unpack_message(packed) == message  # lossless, byte for byte
    return {
        "json": len(message),
        "json+zlib": len(z(message, 9)),
        "json, packed views": len(b64),
        "json, packed views+zlib": len(z(b64, 9)),
        "binary (packed-1 body)": binary,
        "packed-1 (binary+deflate+dict)": len(packed),
    }


def batched(reports: list[TelemetryReport], k: int) -> list[bytes]:
    """Packed messages of up to ``k`` consecutive reports each, within the uplink's batch
    size (``BATCH_BYTES`` of JSON, as ``Uplink.pump`` takes them from the outbox)."""
    out = []
    i = 0
    while i + k <= len(reports):
        n = k
        while n > 1 and len(Batch(DEVICE_ID, tuple(reports[i : i + n]), floor=1).to_bytes()) > (
            BATCH_BYTES
        ):
            n -= 1
        batch = Batch(DEVICE_ID, tuple(reports[i : i + n]), floor=reports[i].seq)
        out.append(pack_message(batch.to_bytes()))
        i += n
    return out


def coalesced(
    reports: list[TelemetryReport], policy: CoalescePolicy, interval: float
) -> list[bytes]:
    """The packed messages the uplink sends for ``reports`` (one every ``interval`` s) under
    ``policy``, acks assumed prompt: after each report the uplink asks the rule, as the sync
    loop's pump does, and sends what is pending unless the rule holds it."""
    out: list[bytes] = []
    pending: list[TelemetryReport] = []
    held_since: float | None = None
    for i, report in enumerate(reports):
        now = i * interval
        pending.append(report)
        size = sum(len(r.to_bytes()) for r in pending)
        if policy.hold(pending, size, held_since, now):
            held_since = now if held_since is None else held_since
            continue
        batch = Batch(DEVICE_ID, tuple(pending), floor=pending[0].seq)
        out.append(pack_message(batch.to_bytes()))
        pending, held_since = [], None
    return out


def measure(
    reports: list[TelemetryReport], per_day: float, policy: CoalescePolicy, interval: float
) -> dict[str, tuple[float, float]]:
    """Mean bytes per report interval and bytes per device per day, by encoding."""
    rows: dict[str, list[int]] = {}
    for r in reports:
        message = Batch(DEVICE_ID, (r,), floor=r.seq).to_bytes()
        for name, n in encodings(message).items():
            rows.setdefault(name, []).append(n)
    out = {name: statistics.fmean(v) for name, v in rows.items()}
    for k in BATCHED:
        messages = batched(reports, k)
        out[f"packed-1, {k} reports a message"] = sum(map(len, messages)) / (len(reports) // k * k)
    messages = coalesced(reports, policy, interval)
    out[COALESCED] = sum(map(len, messages)) / len(reports)
    out[MESSAGES] = len(messages) / len(reports)  # messages per report interval
    return {name: (mean, mean * per_day) for name, mean in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated per level")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="simulated minutes before, not measured"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "deploy" / "agent.example.toml")
    parser.add_argument("--report-interval", type=float, default=0.0, help="override, seconds")
    parser.add_argument("--window-seconds", type=float, default=0.0, help="override, seconds")
    parser.add_argument("--window-values", type=int, default=0, help="override, rows")
    args = parser.parse_args(argv)
    example = load_config(args.config, env={})
    if args.report_interval:
        sync = dataclasses.replace(example.sync, report_interval_seconds=args.report_interval)
        example = dataclasses.replace(example, sync=sync)
    if args.window_seconds or args.window_values:
        drift = dataclasses.replace(
            example.drift,
            window_seconds=args.window_seconds or example.drift.window_seconds,
            window_values=args.window_values or example.drift.window_values,
        )
        example = dataclasses.replace(example, drift=drift)
    interval = example.sync.report_interval_seconds
    per_day = 86_400 / interval
    shown = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    print(
        f"config {shown}: report every {interval:g} s ({per_day:g}/day), drift windows of"
        f" {example.drift.window_values} rows or {example.drift.window_seconds:g} s;"
        f" {args.minutes:g} simulated minutes per level measured after {args.warmup:g} of warm-up"
    )
    fixed = dataclasses.replace(
        example, drift=dataclasses.replace(example.drift, windows_per_hour=0.0)
    )
    runs = {"adaptive": example, "fixed": fixed}
    policy = CoalescePolicy(
        max_delay=example.sync.report_coalesce_seconds,
        max_bytes=example.sync.batch_max_bytes // 2,
    )
    results: dict[str, dict[str, dict[str, tuple[float, float]]]] = {k: {} for k in runs}
    windows: dict[str, dict[str, float]] = {k: {} for k in runs}
    alerts: dict[str, dict[str, int]] = {k: {} for k in runs}  # alerting windows measured
    with tempfile.TemporaryDirectory() as tmp:
        bundle, root, rows = build_bundle(Path(tmp))
        for label, rate in LEVELS:
            for kind, config in runs.items():  # alternating, so both see the same load
                reports = simulate(config, bundle, root, rows, rate, args.minutes, args.warmup)
                n = sum(len(m.drift) for r in reports for m in r.models.values())
                alerts[kind][label] = sum(
                    w.alert for r in reports for m in r.models.values() for w in m.drift
                )
                windows[kind][label] = n * 86_400 / (len(reports) * interval)
                results[kind][label] = measure(reports, per_day, policy, interval)
    heads = [label for label, _ in LEVELS]
    d = example.drift
    budget = (
        f"budget {d.windows_per_hour:g} windows an hour per tensor, {d.window_burst} in a row"
        if d.windows_per_hour
        else "no window budget in this config: both runs are fixed windows"
    )
    print(f"\n## The config as it is ({budget})")
    print(
        "\ndrift windows per day: "
        + ", ".join(f"{h}: {windows['adaptive'][h]:,.0f}" for h in heads)
    )
    print("\n| encoding | " + " | ".join(f"{h}: B/report, MB/day" for h in heads) + " |")
    print("|---|" + "---|" * len(heads))
    for name in results["adaptive"][heads[0]]:
        if name == MESSAGES:
            continue
        cells = [
            f"{results['adaptive'][h][name][0]:,.0f} B,"
            f" {results['adaptive'][h][name][1] / 1e6:.2f} MB"
            for h in heads
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    delay = example.sync.report_coalesce_seconds
    print(
        "\n## Adaptive vs fixed, packed-1, per device per day"
        f" (alerting: windows whose verdict alerted, of those measured in {args.minutes:g} min;"
        " the traffic is held-out digits, undrifted)"
    )
    print("\n| drift windows, messages | " + " | ".join(f"{h}" for h in heads) + " |")
    print("|---|" + "---|" * len(heads))
    for kind, title in (
        ("fixed", f"fixed windows ({d.window_values:,} rows or {d.window_seconds:g} s)"),
        ("adaptive", f"window budget ({d.windows_per_hour:g}/h, burst {d.window_burst})"),
    ):
        for enc, how in ((PACKED, "one message per report"), (COALESCED, f"coalesced {delay:g} s")):
            cells = []
            for h in heads:
                msgs = results[kind][h][MESSAGES][1] if enc == COALESCED else per_day
                cells.append(
                    f"{windows[kind][h]:,.0f} windows ({alerts[kind][h]} alerting),"
                    f" {msgs:,.0f} msgs,"
                    f" {results[kind][h][enc][1] / 1e6:.2f} MB"
                )
            print(f"| {title}, {how} | " + " | ".join(cells) + " |")
    old, new = (
        TelemetryAck(DEVICE_ID, 123456),
        TelemetryAck(DEVICE_ID, 123456, accepts=ACCEPTED_ENCODINGS),
    )
    ack = len(new.to_bytes())
    quiet = results["adaptive"][heads[0]][MESSAGES][1]  # messages a day, idle, coalesced
    print(
        f"\nacks (server -> device, one per message): {len(old.to_bytes())} B before,"
        f" {ack} B with accepts ({ack * per_day / 1e6:.2f} MB/day at one message per report,"
        f" {ack * quiet / 1e6:.2f} MB/day at {quiet:,.0f} messages coalesced)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
