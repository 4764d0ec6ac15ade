"""Certificate renewal against a real Mosquitto with TLS, client certificates, ACLs and a CRL.

A device whose certificates live 20 seconds renews them again and again over MQTT (new key,
CSR on its ``cert/req`` topic, the CA's ``RenewalService`` on the server's session), reconnects
with each new pair and confirms, and the CA revokes the old certificate and makes the broker
re-read the CRL (SIGHUP, coalesced, as ``fleet-server ca serve`` does in a deployment). Telemetry
flows the whole time: every seq is stored once and acknowledged, nothing is lost across the
reconnects and across the expiry of the first certificate. A revoked pair is refused by the
broker; a kill -9 at every step of a renewal leaves a pair the broker accepts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent.common.identity import IdentityStore
from fleet import FleetHarness, wait_until
from fleet_server.pki.crl_reload import CoalescedReload
from fleet_server.pki.renewal import RenewalService
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("dev-a", "dev-b")
LIFE = timedelta(seconds=20)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def _short_lived(broker: FleetBroker, device_id: str) -> IdentityStore:
    """Replace the device's year-long certificate by one that lives ``LIFE``."""
    store = IdentityStore(broker.creds[device_id].cert.parent)
    now = datetime.now(UTC)
    cert = broker.ca.sign_csr(store.write_csr(device_id), device_id, now=now, validity=LIFE)
    store.install_certificate(cert, device_id, now)
    return store


def _accepts(broker: FleetBroker, cert: Path, key: Path) -> bool:
    """Whether the broker completes a TLS handshake with this client pair (TLS 1.2: a
    refused client certificate fails the handshake itself)."""
    ctx = ssl.create_default_context(cafile=str(broker.ca.cert_path))
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with (
            socket.create_connection((broker.host, broker.port), 2) as raw,
            ctx.wrap_socket(raw, server_hostname=broker.host) as tls,
        ):
            tls.do_handshake()
            tls.settimeout(0.5)
            # Mosquitto may accept the handshake and then drop a revoked client: read to see.
            try:
                return tls.recv(1) != b""
            except TimeoutError:
                return True
    except OSError:
        return False


def test_renewal_across_expiry_under_traffic_loses_nothing(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    store = _short_lived(broker, "dev-a")
    first = store.current_certificate()
    fleet = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
    reload = CoalescedReload(broker.reload, interval=0.2)
    service = RenewalService(
        broker.ca,
        fleet.client,
        prefix=broker.prefix,
        validity=LIFE,
        min_interval=1.0,
        crl_changed=reload,
    )
    service.start()
    kept = tmp_path / "kept"
    try:
        device = fleet.start_device(
            "dev-a",
            report_interval_seconds=0.2,
            renew_fraction=0.5,
            renew_timeout_seconds=10.0,
            renew_retry_min_seconds=1.0,
            renew_retry_max_seconds=2.0,
        )
        renewer = device.sync._renewer
        assert renewer is not None
        wait_until(lambda: renewer.renewals >= 1, timeout=40, what="the first renewal")
        # Keep a copy of the first renewed pair: it must be refused once it is replaced.
        kept.mkdir()
        shutil.copy(store.cert_path, kept / "c.crt")
        shutil.copy(store.key_path, kept / "c.key")
        wait_until(lambda: renewer.renewals >= 3, timeout=60, what="three renewals")
        wait_until(lambda: renewer.state == "idle", timeout=20, what="the last confirmation")
        assert datetime.now(UTC) > first.not_valid_after_utc, "renewed across expiry"
        wait_until(
            lambda: fleet.registry.seq_state("dev-a").acked_upto >= 20, what="telemetry acked"
        )
        fleet.stop_device("dev-a")  # stop producing; what is left was produced before
        device = fleet.start_device("dev-a", report_interval_seconds=3600)
        wait_until(lambda: device.sync.outbox.stats().entries == 0, timeout=30, what="drain")
    finally:
        fleet.close()
    seqs = [t.seq for t in fleet.registry.telemetry(device_id="dev-a", limit=100_000)]
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate: something was lost"
    state = fleet.registry.seq_state("dev-a")
    assert (state.lost, state.gaps, state.acked_upto) == (0, 0, len(seqs))
    # Events made it too: one cert_renewed per renewal, no failure needed here.
    rows = fleet.registry.telemetry(device_id="dev-a", limit=100_000)
    kinds = [t.payload.get("kind") for t in rows]
    assert kinds.count("cert_renewed") >= 3
    # The CA: exactly one live certificate of dev-a, every older one revoked or expired.
    now = datetime.now(UTC)
    live = [
        c
        for c in broker.ca.issued()
        if c.name == "dev-a" and c.revoked_at is None and c.not_after > now
    ]
    assert [c.serial for c in live] == [store.current_certificate().serial_number]
    assert service.counts["confirmed"] >= 3
    assert service.counts["crl_updates"] >= 3
    reload.close()
    assert reload.runs >= 1
    assert reload.failures == 0
    # The broker: the current pair is accepted, the replaced (revoked) one refused.
    assert _accepts(broker, store.cert_path, store.key_path)
    assert not _accepts(broker, kept / "c.crt", kept / "c.key")


def test_a_refused_renewal_is_retried_and_reported_and_the_old_pair_kept(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    store = _short_lived(broker, "dev-b")
    before = store.cert_path.read_bytes()
    fleet = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
    # The registry says the device is revoked: the CA refuses every renewal.
    service = RenewalService(
        broker.ca,
        fleet.client,
        prefix=broker.prefix,
        validity=LIFE,
        min_interval=0.0,
        allowed=lambda _d: "revoked",
    )
    service.start()
    try:
        device = fleet.start_device(
            "dev-b",
            report_interval_seconds=0.5,
            renew_fraction=0.1,
            renew_timeout_seconds=5.0,
            renew_retry_min_seconds=0.5,
            renew_retry_max_seconds=1.0,
        )
        renewer = device.sync._renewer
        assert renewer is not None
        wait_until(lambda: renewer.failures >= 2, timeout=30, what="two failed attempts")
        status = device.sync.status()["certificate"]
        assert status["failures"] >= 2
        assert "revoked" in status["last_error"]
        assert store.cert_path.read_bytes() == before, "the working pair was replaced"
        assert not store.next_key_path.exists()
        assert not store.next_cert_path.exists()
        assert device.sync.client.connected
        wait_until(
            lambda: any(
                t.payload.get("kind") == "cert_renewal_failed"
                for t in fleet.registry.telemetry(device_id="dev-b", limit=100_000)
            ),
            what="the failure reported",
        )
    finally:
        fleet.close()
    assert service.counts["refused"] >= 2
    assert service.counts["issued"] == 0


# The steps of one renewal, run in a child process that SIGKILLs itself at step ``KILL_AT``
# (inside IdentityStore's own writes: its write_atomic is wrapped to kill on the Nth call).
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    import edge_agent.common.identity as identity
    from edge_agent.common.identity import IdentityStore, build_csr
    from fleet_server.pki.ca import CertificateAuthority

    store, ca_dir, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    kill_at = int(sys.argv[4])
    writes = 0
    real = identity.write_atomic
    def counted(*args, **kwargs):
        global writes
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args, **kwargs)
    identity.write_atomic = counted
    s = IdentityStore(store)
    now = datetime.now(UTC)
    key = s.create_next_key()                                   # write 1: next key
    ca = CertificateAuthority.open(ca_dir)
    serial = s.current_certificate().serial_number
    cert, _ = ca.renew_device(device, serial, build_csr(key, device), now=now,
                              validity=timedelta(minutes=5))
    s.install_next_certificate(cert, device, now)               # write 2: next cert
    s.promote_next()                                            # writes 3, 4: key, cert
    if kill_at == 5:
        os.kill(os.getpid(), signal.SIGKILL)                    # after everything
    """
)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_kill_9_at_any_renewal_step_leaves_a_working_pair(
    broker: FleetBroker, tmp_path: Path, kill_at: int
) -> None:
    store = IdentityStore(broker.creds["dev-b"].cert.parent)
    original = store.current_certificate().serial_number
    k = str(kill_at)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(script), str(store.directory), str(broker.ca.directory), "dev-b", k],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cert = store.recover("dev-b", datetime.now(UTC))
    assert cert is not None
    assert not store.next_key_path.exists()
    assert not store.next_cert_path.exists()
    assert _accepts(broker, store.cert_path, store.key_path)
    # Killed once the new certificate was on disk (writes 3 and on): the new pair won.
    assert (cert.serial_number != original) == (kill_at >= 3)
