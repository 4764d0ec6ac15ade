"""Provisioning claims end to end: 100 devices enroll at first boot with one batch claim.

The CA's enrollment listener runs over TLS (its certificate issued by the fleet CA) in this
process; 100 simulated devices, each with its own identity directory, generate their own keys
and enroll through the real HTTP path with real CSRs and the real CA, concurrently. The CA is
the one a real Mosquitto trusts, so the enrolled identities are then accepted by the broker.
The claim's limit, revocation, expiry, approval step and its refusal to re-key an existing
identity are checked the same way.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.common.enroll import (
    CLAIM_FILE,
    ClaimConfig,
    enroll_with_claim,
    load_claim,
)
from edge_agent.common.identity import IdentityStore
from edge_agent.errors import ClaimRefusedError, TransportError
from fleet_server.admin.ops.enrollment import EnrollmentServer, create_enrollment_app
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


@dataclass
class Listener:
    broker: FleetBroker
    url: str
    enrolled: list[tuple[str, str]]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    with fleet_broker(tmp_path / "mqtt", ()) as broker:
        ca = broker.ca
        pair = ca.issue_broker_identity(
            dns_names=("localhost",), ip_addresses=("127.0.0.1",), now=datetime.now(UTC)
        )
        (tmp_path / "enroll.key").write_bytes(pair.key_pem)
        (tmp_path / "enroll.crt").write_bytes(pair.cert_pem)
        enrolled: list[tuple[str, str]] = []
        app = create_enrollment_app(ca, on_enrolled=lambda d, c: enrolled.append((d, c)))
        server = EnrollmentServer(
            app,
            "127.0.0.1",
            0,
            certfile=tmp_path / "enroll.crt",
            keyfile=tmp_path / "enroll.key",
        )
        server.start()
        try:
            yield Listener(broker, f"https://127.0.0.1:{server.port}/v1/enroll", enrolled)
        finally:
            server.stop()


def _device(root: Path, listener: Listener, device_id: str, claim: str) -> IdentityStore:
    """A freshly provisioned device: fleet CA and claim file, no key, no certificate."""
    store = IdentityStore(root / device_id)
    store.provision_ca(listener.broker.ca.cert_pem)
    (store.directory / CLAIM_FILE).write_text(json.dumps({"url": listener.url, "claim": claim}))
    return store


def _first_boot(store: IdentityStore, device_id: str) -> str:
    claim = load_claim(store)
    assert claim is not None
    return enroll_with_claim(store, device_id, claim, now=datetime.now(UTC), timeout=30)


def _broker_accepts(broker: FleetBroker, store: IdentityStore) -> bool:
    ctx = ssl.create_default_context(cafile=str(store.ca_path))
    ctx.load_cert_chain(str(store.cert_path), str(store.key_path))
    try:
        with (
            socket.create_connection((broker.host, broker.port), 2) as raw,
            ctx.wrap_socket(raw, server_hostname=broker.host) as tls,
        ):
            tls.do_handshake()
            return True
    except OSError:
        return False


def test_a_batch_of_100_devices_enrolls_with_one_claim(listener: Listener, tmp_path: Path) -> None:
    ca = listener.broker.ca
    secret = ca.create_claim("line-7", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=100)
    ids = [f"cam-{i:03d}" for i in range(100)]
    stores = [_device(tmp_path / "devices", listener, d, secret) for d in ids]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(_first_boot, stores, ids))
    assert outcomes == ["enrolled"] * 100
    for store, device_id in zip(stores, ids, strict=True):
        assert store.current_certificate().subject.rfc4514_string() == f"OU=device,CN={device_id}"
        assert not (store.directory / CLAIM_FILE).exists()
        assert store.key_path.stat().st_mode & 0o077 == 0
    assert sorted(d for d, _c in listener.enrolled) == ids
    (record,) = ca.claims()
    assert sorted(record.enrolled) == ids
    assert record.state(datetime.now(UTC)) == "full"
    # The 101st device of the batch is refused: the claim is used up.
    extra = _device(tmp_path / "devices", listener, "cam-100", secret)
    with pytest.raises(ClaimRefusedError) as refused:
        _first_boot(extra, "cam-100")
    assert refused.value.reason == "full"
    assert not extra.cert_path.exists()
    # The keys never left the devices, and the identities are good for the real broker.
    for store in stores[:5]:
        assert _broker_accepts(listener.broker, store)


def test_a_claim_never_rekeys_an_existing_identity(listener: Listener, tmp_path: Path) -> None:
    ca = listener.broker.ca
    secret = ca.create_claim("batch", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=10)
    assert _first_boot(_device(tmp_path / "a", listener, "gw-1", secret), "gw-1") == "enrolled"
    # Someone else with the same claim asks for gw-1 with their own key: refused.
    thief = _device(tmp_path / "b", listener, "gw-1", secret)
    with pytest.raises(ClaimRefusedError) as refused:
        _first_boot(thief, "gw-1")
    assert refused.value.reason == "device_exists"
    assert [c.name for c in ca.issued()].count("gw-1") == 1


def test_revoking_or_expiring_the_claim_stops_enrollments(
    listener: Listener, tmp_path: Path
) -> None:
    ca = listener.broker.ca
    now = datetime.now(UTC)
    secret = ca.create_claim("revoked-batch", now=now, ttl=timedelta(hours=1), limit=10)
    assert _first_boot(_device(tmp_path, listener, "d-1", secret), "d-1") == "enrolled"
    ca.revoke_claim("revoked-batch", now=now)
    with pytest.raises(ClaimRefusedError) as refused:
        _first_boot(_device(tmp_path, listener, "d-2", secret), "d-2")
    assert refused.value.reason == "revoked"
    old = ca.create_claim(
        "old-batch", now=now - timedelta(hours=2), ttl=timedelta(hours=1), limit=5
    )
    with pytest.raises(ClaimRefusedError) as refused:
        _first_boot(_device(tmp_path, listener, "d-3", old), "d-3")
    assert refused.value.reason == "expired"
    wrong = "revoked-batch." + "A" * 43
    with pytest.raises(ClaimRefusedError) as refused:
        _first_boot(_device(tmp_path, listener, "d-4", wrong), "d-4")
    assert refused.value.reason == "unknown"
    assert {c.name for c in ca.issued() if c.role == "device"} == {"d-1"}


def test_approval_holds_devices_until_the_operator_approves(
    listener: Listener, tmp_path: Path
) -> None:
    ca = listener.broker.ca
    secret = ca.create_claim(
        "gated", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=3, require_approval=True
    )
    stores = {d: _device(tmp_path, listener, d, secret) for d in ("g-1", "g-2")}
    assert _first_boot(stores["g-1"], "g-1") == "pending"
    assert _first_boot(stores["g-2"], "g-2") == "pending"
    assert _first_boot(stores["g-1"], "g-1") == "pending"  # asking again changes nothing
    assert not stores["g-1"].cert_path.exists()
    (record,) = ca.claims()
    assert [p.device_id for p in record.pending] == ["g-1", "g-2"]
    ca.approve_claim("gated", ["g-1"], now=datetime.now(UTC))
    assert _first_boot(stores["g-1"], "g-1") == "enrolled"
    assert _first_boot(stores["g-2"], "g-2") == "pending"
    assert _broker_accepts(listener.broker, stores["g-1"])


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"not json", 400),
        (b"[]", 400),
        (b'{"schema_version": 1, "type": "claim_enrollment"}', 400),
        (b"{" * 100_000, 413),
        (
            b'{"schema_version":1,"type":"claim_enrollment","claim":"x.y","device_id":"a",'
            b'"csr":"-----BEGIN CERTIFICATE REQUEST-----\\nAA==\\n'
            b'-----END CERTIFICATE REQUEST-----\\n"}',
            400,
        ),
    ],
)
def test_hostile_bodies_get_a_clean_refusal(listener: Listener, body: bytes, status: int) -> None:
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(listener.broker.ca.cert_path))
    request = urllib.request.Request(listener.url, data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10, context=ctx)
    answer.value.close()
    assert answer.value.code == status
    assert listener.broker.ca.claims() == []


def test_a_listener_with_another_ca_gets_no_claim(listener: Listener, tmp_path: Path) -> None:
    """The device verifies the listener against its provisioned fleet CA: a look-alike
    endpoint (here: the right host, but the device trusts a different CA) gets nothing."""
    from fleet_server.pki.ca import CertificateAuthority

    other = CertificateAuthority.init(tmp_path / "other", now=datetime.now(UTC))
    store = IdentityStore(tmp_path / "dev")
    store.provision_ca(other.cert_pem)
    with pytest.raises(TransportError) as failed:
        enroll_with_claim(
            store,
            "dev-x",
            ClaimConfig(listener.url, "any." + "A" * 43),
            now=datetime.now(UTC),
            timeout=10,
        )
    assert "unreachable" in str(failed.value)
    assert listener.enrolled == []


def test_ca_serve_enrolls_by_claim_and_renews_over_mqtt(tmp_path: Path) -> None:
    """``fleet-server ca serve`` as a real process: a device enrolls with a claim over HTTPS,
    then renews over MQTT; the old certificate is revoked and the broker reloads its CRL
    through the pid file."""
    import shutil
    import subprocess
    import sys

    from edge_agent.common.mqtt import MqttClient
    from edge_agent.common.mqtt_types import MqttConfig
    from edge_agent.sync.ops.renewal import CertRenewer, RenewalPolicy
    from edge_agent.wire.topics import Topics
    from fleet import stop_process
    from mosquitto import RELOADED, free_port
    from support import wait_until

    with fleet_broker(tmp_path / "mqtt", (), workers=("ca.server",)) as broker:
        ident = tmp_path / "ca-identity"
        ident.mkdir()
        shutil.copy(broker.creds["ca.server"].cert, ident / "server.crt")
        shutil.copy(broker.creds["ca.server"].key, ident / "server.key")
        assert broker.proc is not None
        (tmp_path / "mosquitto.pid").write_text(str(broker.proc.pid))
        port = free_port()
        exe = str(Path(sys.executable).parent / "fleet-server")
        log = (tmp_path / "ca-serve.log").open("wb")
        proc = subprocess.Popen(
            [
                *(exe, "ca", "serve", "--ca-dir", str(broker.ca.directory)),
                *("--identity-dir", str(ident), "--broker-port", str(broker.port)),
                *("--broker-pid-file", str(tmp_path / "mosquitto.pid"), "--device-days", "1"),
                *("--crl-reload-interval", "0.2"),
                *("--enroll-port", str(port), "--enroll-ip", "127.0.0.1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = None
        try:
            secret = broker.ca.create_claim(
                "line", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=5
            )
            store = IdentityStore(tmp_path / "cam-1")
            store.provision_ca(broker.ca.cert_pem)
            claim = ClaimConfig(f"https://127.0.0.1:{port}/v1/enroll", secret)

            def enrolled() -> bool:
                try:
                    return (
                        enroll_with_claim(store, "cam-1", claim, now=datetime.now(UTC), timeout=5)
                        == "enrolled"
                    )
                except TransportError:
                    return False

            wait_until(enrolled, 30, what="enrollment through ca serve")
            first = store.current_certificate()
            client = MqttClient(
                MqttConfig(
                    host=broker.host,
                    port=broker.port,
                    device_id="cam-1",
                    ca_path=store.ca_path,
                    cert_path=store.cert_path,
                    key_path=store.key_path,
                )
            )
            topics = Topics(broker.prefix)
            req = topics.publication("cert_req", "cam-1")
            ahead = [timedelta(hours=20)]
            mqtt = client
            renewer = CertRenewer(
                store,
                "cam-1",
                publish=lambda b: mqtt.publish(req.topic, b, req.qos, req.retain),
                switch=client.switch_identity,
                event=lambda k, _d: k == "cert_renewed" and ahead.__setitem__(0, timedelta(0)),
                policy=RenewalPolicy(fraction=0.5, timeout=10.0, retry_min=1.0, retry_max=2.0),
                now=lambda: datetime.now(UTC) + ahead[0],
            )
            client.subscribe(topics.device("cert_resp", "cam-1"), renewer.on_response)
            client.connect()
            client.wait_connected(10)
            reloads = broker.log.read_text(errors="replace").count(RELOADED)

            def renewed() -> bool:
                renewer.drive()
                return renewer.renewals == 1 and renewer.state == "idle"

            wait_until(renewed, 60, what="renewal through ca serve")
            assert store.current_certificate().serial_number != first.serial_number
            revoked = {c.serial for c in broker.ca.issued() if c.revoked_at is not None}
            assert first.serial_number in revoked
            wait_until(
                lambda: broker.log.read_text(errors="replace").count(RELOADED) > reloads,
                10,
                what="the broker to reload its CRL",
            )
        finally:
            if client is not None:
                client.close()
            stop_process(proc)
            log.close()
        assert proc.returncode == 0, (tmp_path / "ca-serve.log").read_text()


def test_edge_agent_identity_claim_cli(listener: Listener, tmp_path: Path) -> None:
    """``edge-agent identity claim`` enrolls the configured device with its claim.json."""
    from click.testing import CliRunner

    from edge_agent.cli.main import cli as agent_cli

    ca = listener.broker.ca
    secret = ca.create_claim("cli", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=1)
    store = _device(tmp_path, listener, "kiosk-1", secret)
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "kiosk-1"\n[sync]\nidentity_dir = "{store.directory}"\n')
    result = CliRunner().invoke(agent_cli, ["identity", "claim", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "enrolled"
    assert store.current_certificate().serial_number in {c.serial for c in ca.issued()}
    again = CliRunner().invoke(agent_cli, ["identity", "claim", "--config", str(config)])
    assert again.exit_code != 0  # claim.json is gone once enrolled


def test_the_daemon_enrolls_at_first_boot_then_connects(listener: Listener, tmp_path: Path) -> None:
    """``edge-agent run`` on a device that has only the fleet CA and claim.json: it generates
    its key, enrolls, and connects to the broker with the new identity."""
    from fleet import start_daemon, stop_process
    from model_builder.keystore import KeyStore
    from mosquitto import free_port
    from support import wait_until

    broker = listener.broker
    secret = broker.ca.create_claim("boot", now=datetime.now(UTC), ttl=timedelta(hours=1), limit=1)
    store = _device(tmp_path, listener, "cam-boot", secret)
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "cam-boot"\n'
        f"[api]\nport = {free_port()}\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
        f'[sync]\nenabled = true\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'identity_dir = "{store.directory}"\nprefix = "{broker.prefix}"\n'
        "reconnect_max_seconds = 1.0\n"
    )
    assert not store.key_path.exists()
    proc = start_daemon(config, tmp_path / "agent.log")
    try:
        wait_until(
            lambda: "as cam-boot" in broker.log.read_text(errors="replace"),
            60,
            what="the daemon to connect with its enrolled identity",
        )
    finally:
        stop_process(proc)
    assert store.cert_path.exists()
    assert not (store.directory / CLAIM_FILE).exists()
    assert [d for d, _c in listener.enrolled] == ["cam-boot"]
