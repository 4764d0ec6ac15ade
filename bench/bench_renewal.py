"""Benchmark certificate renewal: the CA's cost for a whole fleet, then over a real broker.

A. CA only (``--devices``, default 1,000): a file-backed CA with that many enrolled devices;
   each device renews once, sequentially: the device's key + CSR generation, then the CA's
   ``renew_device`` (checks, signs, records the serial) and ``confirm_device`` (revokes the old
   certificate and rewrites the CRL, every write fsynced under the CA's lock). Reports per-call
   p50/p99 and the total, the CRL and state file size afterwards. This is the CA's cost; no
   network.
B. Over a real Mosquitto (TLS, ACLs, CRL) with ``--broker-devices`` (default 100) devices in
   this process, all renewing at once: each a real ``MqttClient`` with its own certificate and
   a ``CertRenewer`` (new key, CSR on ``cert/req``, reconnect with the new pair, confirm); the
   CA's ``RenewalService`` on the server's session; confirmations make the broker re-read
   the CRL (SIGHUP, waited for in its log; coalesced, ``--reload-interval``). Reports
   the time until every device runs on its new certificate and per-device latency (start ->
   confirmed), and checks that every old certificate is revoked.

Usage:
    .venv/bin/python bench/bench_renewal.py [--devices 1000] [--broker-devices 100]
        [--reload-interval 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cryptography import x509

from edge_agent.common.identity import IdentityStore, build_csr, generate_device_key
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.sync.ops.renewal import CertRenewer, RenewalPolicy
from edge_agent.wire.topics import Topics
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.crl_reload import CoalescedReload
from fleet_server.pki.renewal import RenewalService


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ca_only(root: Path, devices: int) -> dict[str, float]:
    """Part A: enroll ``devices``, then renew + confirm each once."""
    now = datetime.now(UTC)
    ca = CertificateAuthority.init(root / "ca", now=now)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    serials = {}
    t0 = time.perf_counter()
    for d in ids:
        pem = ca.sign_csr(build_csr(generate_device_key(), d), d, now=now)
        serials[d] = x509.load_pem_x509_certificate(pem).serial_number
    enroll_s = time.perf_counter() - t0
    csr_ms: list[float] = []
    renew_ms: list[float] = []
    confirm_ms: list[float] = []

    t0 = time.perf_counter()
    for d in ids:
        a = time.perf_counter()
        csr = build_csr(generate_device_key(), d)
        b = time.perf_counter()
        pem, _ = ca.renew_device(d, serials[d], csr, now=now)
        c = time.perf_counter()
        ca.confirm_device(d, x509.load_pem_x509_certificate(pem).serial_number, now=now)
        e = time.perf_counter()
        csr_ms.append((b - a) * 1000)
        renew_ms.append((c - b) * 1000)
        confirm_ms.append((e - c) * 1000)
    total = time.perf_counter() - t0
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    return {
        "devices": devices,
        "enroll_s": enroll_s,
        "total_s": total,
        "csr_p50": _pct(csr_ms, 0.5),
        "renew_p50": _pct(renew_ms, 0.5),
        "renew_p99": _pct(renew_ms, 0.99),
        "confirm_p50": _pct(confirm_ms, 0.5),
        "confirm_p99": _pct(confirm_ms, 0.99),
        "first_confirm": confirm_ms[0],
        "last_confirm": statistics.mean(confirm_ms[-10:]),
        "crl_entries": len(list(crl)),
        "crl_kib": ca.crl_path.stat().st_size / 1024,
        "state_kib": (ca.directory / "state.json").stat().st_size / 1024,
    }


def over_broker(root: Path, devices: int, interval: float) -> dict[str, float]:
    """Part B: ``devices`` renew at once over a real Mosquitto."""
    from mosquitto import fleet_broker

    ids = tuple(f"dev-{i:04d}" for i in range(devices))
    with fleet_broker(root / "mqtt", ids) as broker:
        server_creds = broker.creds[broker.server]
        server = MqttClient(
            MqttConfig(
                host=broker.host,
                port=broker.port,
                device_id=broker.server,
                ca_path=server_creds.ca,
                cert_path=server_creds.cert,
                key_path=server_creds.key,
                announce_status=False,
                inbox_size=100_000,
            )
        )
        crashed = []

        def sighup() -> None:
            if broker.proc is None or broker.proc.poll() is not None:
                return
            try:
                broker.reload()
            except AssertionError:  # the fixture's check that Mosquitto survived the reload
                crashed.append(broker.log.read_bytes()[-300:].decode(errors="replace"))

        reload = CoalescedReload(sighup, interval=interval)
        service = RenewalService(broker.ca, server, min_interval=0.0, crl_changed=reload)
        service.start()
        server.connect()
        server.wait_connected(10)
        topics = Topics(broker.prefix)
        clients, renewers = [], []
        for d in ids:
            creds = broker.creds[d]
            client = MqttClient(
                MqttConfig(
                    host=broker.host,
                    port=broker.port,
                    device_id=d,
                    ca_path=creds.ca,
                    cert_path=creds.cert,
                    key_path=creds.key,
                    reconnect_max=2.0,
                )
            )
            req = topics.publication("cert_req", d)
            # The clock reads 200 days ahead (the certificate is due) until the device runs
            # on its new certificate, then the real time (the new one is not due again).
            ahead = [timedelta(days=200)]
            renewer = CertRenewer(
                IdentityStore(creds.cert.parent),
                d,
                publish=lambda b, c=client, r=req: c.publish(r.topic, b, r.qos, r.retain),
                switch=client.switch_identity,
                event=lambda k, _d, a=ahead: k == "cert_renewed" and a.__setitem__(0, timedelta(0)),
                policy=RenewalPolicy(fraction=0.5, timeout=60.0, retry_min=1.0, retry_max=5.0),
                now=lambda a=ahead: datetime.now(UTC) + a[0],
            )
            client.subscribe(topics.device("cert_resp", d), renewer.on_response)
            client.connect()
            clients.append(client)
            renewers.append(renewer)
        for c in clients:
            c.wait_connected(30)
        old = {d: IdentityStore(broker.creds[d].cert.parent).current_certificate() for d in ids}
        latency: list[float] = []
        lock = threading.Lock()
        start = time.perf_counter()

        def run(renewer: CertRenewer) -> None:
            t0 = time.perf_counter()
            pause = threading.Event()
            renewer.drive()
            while (
                renewer.renewals == 0 or renewer.state != "idle"
            ) and time.perf_counter() - t0 < 300:
                pause.wait(0.02)
                renewer.drive()
            if renewer.renewals > 0 and renewer.state == "idle":
                with lock:
                    latency.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in renewers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, 300 - (time.perf_counter() - start)))
        wall = time.perf_counter() - start
        died = broker.proc is None or broker.proc.poll() is not None
        if died:
            crashed.append(broker.log.read_bytes()[-300:].decode(errors="replace"))
        revoked = {c.serial for c in broker.ca.issued() if c.revoked_at is not None}
        all_old_revoked = all(old[d].serial_number in revoked for d in ids)
        failures = sum(r.failures for r in renewers)
        for c in clients:
            c.close()
        server.close()
        reload.close()
        return {
            "devices": devices,
            "wall_s": wall,
            "p50_s": _pct(latency, 0.5),
            "p99_s": _pct(latency, 0.99),
            "done": len(latency),
            "failures": failures,
            "crl_reloads": reload.runs,
            "interval": interval,
            "broker_crashed": float(bool(crashed)),
            "all_old_revoked": float(all_old_revoked),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--broker-devices", type=int, default=100)
    parser.add_argument("--reload-interval", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = ca_only(Path(tmp) / "a", args.devices) if args.devices else None
        b = (
            over_broker(Path(tmp) / "b", args.broker_devices, args.reload_interval)
            if args.broker_devices
            else None
        )
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"machine: {machine}")
    if a is not None:
        _print_a(a)
    if b is not None:
        _print_b(b)


def _print_a(a: dict[str, float]) -> None:
    print(
        f"\nA. CA only, {a['devices']:.0f} devices, each renewed once (sequential)\n\n"
        "| step | p50 ms | p99 ms |\n|---|---|---|\n"
        f"| device: new key + CSR | {a['csr_p50']:.2f} | |\n"
        f"| CA: renew (checks, sign, record) | {a['renew_p50']:.1f} | {a['renew_p99']:.1f} |\n"
        f"| CA: confirm (revoke, CRL rewrite) | {a['confirm_p50']:.1f} | {a['confirm_p99']:.1f} |\n"
        f"\ntotal {a['total_s']:.1f} s for {a['devices']:.0f} renewals "
        f"({a['devices'] / a['total_s']:.0f}/s); confirm at the start {a['first_confirm']:.1f} ms, "
        f"at the end {a['last_confirm']:.1f} ms; CRL afterwards {a['crl_entries']:.0f} entries "
        f"({a['crl_kib']:.0f} KiB), CA state file {a['state_kib']:.0f} KiB"
    )


def _print_b(b: dict[str, float]) -> None:
    print(
        f"\nB. Real Mosquitto, {b['devices']:.0f} devices renewing at once\n\n"
        "| devices | all renewed (s) | per device p50 (s) | p99 (s) | failures "
        "| CRL reloads | old certificates revoked |\n|---|---|---|---|---|---|---|\n"
        f"| {b['done']:.0f}/{b['devices']:.0f} | {b['wall_s']:.1f} | {b['p50_s']:.2f} "
        f"| {b['p99_s']:.2f} | {b['failures']:.0f} | {b['crl_reloads']:.0f} "
        f"| {'all' if b['all_old_revoked'] else 'NOT ALL'} |\n\n"
        f"CRL reloads coalesced every {b['interval']:g} s; Mosquitto "
        f"{'CRASHED' if b['broker_crashed'] else 'stayed up'}"
    )


if __name__ == "__main__":
    main()
