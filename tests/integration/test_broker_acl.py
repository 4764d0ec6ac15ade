"""The broker configuration against a real Mosquitto with TLS, client certificates and ACLs.

Every ACL test judges by what is *delivered*: Mosquitto acknowledges a forbidden subscription
and a forbidden publish, then silently filters the messages. Each negative check is paired with
a positive control on the same connection, so a test cannot pass because nothing works.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.common.identity import IdentityStore
from fleet_server.errors import BrokerConfigError
from fleet_server.pki.broker_config import BrokerConfig, BrokerFiles, write_broker_config
from fleet_server.pki.ca import CertificateAuthority
from mosquitto import RELOADED
from support import wait_until

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
pytestmark = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto binary not installed (scripts/setup.sh installs it)"
)

PREFIX = "edgefleet"
SERVER = "fleet.server"
CONSUMER = "grafana.consumer"
WAIT = 5.0
QUIET = 1.0  # how long to wait for a message that must NOT arrive, after a later one did


@dataclass(frozen=True)
class Creds:
    ca: Path
    cert: Path | None
    key: Path | None


@dataclass
class Pki:
    ca: CertificateAuthority
    creds: dict[str, Creds]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A Mosquitto process on a loopback port; ``reload`` (SIGHUP) re-reads the CRL."""

    def __init__(self, conf: Path, port: int, log: Path) -> None:
        self.conf, self.port, self.log = conf, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        proc = self.proc

        def listens() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                return False
            return True

        try:
            wait_until(listens, WAIT, lambda: f"mosquitto on {self.port}: {self.log.read_text()}")
        except pytest.fail.Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.proc = None

    def reload(self) -> None:
        proc = self.proc
        assert proc is not None
        before = self.log.read_text(errors="replace").count(RELOADED)
        proc.send_signal(signal.SIGHUP)
        # Logged in the loop iteration that re-reads the files (and the CRL): a connection made
        # after it is handled under the new configuration.
        wait_until(
            lambda: (
                proc.poll() is not None
                or self.log.read_text(errors="replace").count(RELOADED) > before
            ),
            WAIT,
            lambda: f"mosquitto to reload: {self.log.read_text()}",
        )
        assert proc.poll() is None, self.log.read_text()


class Peer:
    """A paho MQTT v5 client over TLS that records what it receives."""

    def __init__(self, port: int, creds: Creds, client_id: str) -> None:
        self.port = port
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.settled = threading.Event()
        self.subscribed = threading.Event()
        self.connected = False
        self.disconnects = 0
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        c.tls_set(
            ca_certs=str(creds.ca),
            certfile=str(creds.cert) if creds.cert else None,
            keyfile=str(creds.key) if creds.key else None,
        )
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected = not rc.is_failure
        self.settled.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.connected = False
        self.disconnects += 1
        self.settled.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, msg.payload))

    def _on_subscribe(self, *_args: Any) -> None:
        self.subscribed.set()

    def connect(self) -> bool:
        """True iff the broker accepted the connection (CONNACK success) within WAIT."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        self.settled.wait(WAIT)
        if not self.connected:
            return False
        time.sleep(0.2)  # a TLS 1.3 certificate rejection arrives after the client's handshake
        return self.connected

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload); fail if it never comes."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                item = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(item)
            if item == (topic, payload):
                return seen
        pytest.fail(f"{topic} {payload!r} never arrived; got {seen}")

    def drain(self, seconds: float) -> list[tuple[str, bytes]]:
        # Not a wait for something: a quiet period in which what must NOT arrive could have.
        time.sleep(seconds)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def _topic(device: str, leaf: str) -> str:
    return f"{PREFIX}/devices/{device}/{leaf}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)
    ca = CertificateAuthority.init(root / "ca", now=now)
    creds: dict[str, Creds] = {}
    for device in ("dev-a", "dev-b", "dev-c"):
        store = IdentityStore(root / device)
        store.provision_ca(ca.cert_pem)
        csr = store.write_csr(device)  # the key stays in root/<device>
        store.install_certificate(ca.sign_csr(csr, device, now=now), device, now)
        creds[device] = Creds(store.ca_path, store.cert_path, store.key_path)
    pair = ca.issue_server_identity(SERVER, now=now)
    (root / "server.key").write_bytes(pair.key_pem)
    (root / "server.crt").write_bytes(pair.cert_pem)
    creds[SERVER] = Creds(ca.cert_path, root / "server.crt", root / "server.key")
    # Issued before broker-config runs: the generated ACL picks registered consumers up.
    pair = ca.issue_consumer_identity(CONSUMER, now=now)
    (root / "consumer.key").write_bytes(pair.key_pem)
    (root / "consumer.crt").write_bytes(pair.cert_pem)
    creds[CONSUMER] = Creds(ca.cert_path, root / "consumer.crt", root / "consumer.key")
    creds["anonymous"] = Creds(ca.cert_path, None, None)
    return Pki(ca, creds)


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    directory = tmp_path_factory.mktemp("broker")
    port = _free_port()
    config = BrokerConfig(
        port=port, prefix=PREFIX, server_cn=SERVER, run_as_user="root" if _is_root() else None
    )
    files: BrokerFiles = write_broker_config(directory, pki.ca, config, now=datetime.now(UTC))
    b = Broker(files.conf, port, directory / "mosquitto.log")
    b.start()
    yield b
    b.stop()


def _is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def peers(broker: Broker, pki: Pki) -> Iterator[Any]:
    made: list[Peer] = []

    def make(name: str, client_id: str | None = None) -> Peer:
        p = Peer(broker.port, pki.creds[name], client_id or name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _connected(p: Peer) -> Peer:
    assert p.connect(), "positive control: this client must be able to connect"
    return p


def test_device_telemetry_reaches_the_server_via_shared_subscription(peers: Any) -> None:
    server = _connected(peers(SERVER))
    server.subscribe(f"$share/workers/{PREFIX}/devices/+/telemetry")
    a = _connected(peers("dev-a"))
    a.publish(_topic("dev-a", "telemetry"), b"t1")
    assert server.wait_for(_topic("dev-a", "telemetry"), b"t1")[-1] == (
        _topic("dev-a", "telemetry"),
        b"t1",
    )


def test_device_cannot_read_another_devices_desired_state(peers: Any) -> None:
    server = _connected(peers(SERVER))
    a = _connected(peers("dev-a"))
    b = _connected(peers("dev-b"))
    a.subscribe(_topic("dev-b", "desired"))  # acknowledged, but must deliver nothing
    a.subscribe(f"{PREFIX}/devices/+/desired")  # wildcard: only a's own may come through
    b.subscribe(_topic("dev-b", "desired"))
    server.publish(_topic("dev-b", "desired"), b"for-b")
    server.publish(_topic("dev-a", "desired"), b"for-a")
    assert b.wait_for(_topic("dev-b", "desired"), b"for-b")  # the message did exist
    seen = a.wait_for(_topic("dev-a", "desired"), b"for-a") + a.drain(QUIET)
    assert all(topic == _topic("dev-a", "desired") for topic, _ in seen), seen


def test_device_cannot_write_another_devices_topics(peers: Any) -> None:
    server = _connected(peers(SERVER))
    server.subscribe(f"{PREFIX}/devices/#")
    a = _connected(peers("dev-a"))
    a.publish(_topic("dev-b", "telemetry"), b"forged")
    a.publish(_topic("dev-b", "reported"), b"forged")
    a.publish(_topic("dev-a", "desired"), b"self-assigned")  # read-only for the device
    a.publish(_topic("dev-a", "telemetry"), b"marker")
    seen = server.wait_for(_topic("dev-a", "telemetry"), b"marker") + server.drain(QUIET)
    assert [s for s in seen if s[1] != b"marker"] == []


def test_device_reads_broadcast_but_cannot_write_it(peers: Any) -> None:
    server = _connected(peers(SERVER))
    a = _connected(peers("dev-a"))
    b = _connected(peers("dev-b"))
    b.subscribe(f"{PREFIX}/broadcast/#")
    a.publish(f"{PREFIX}/broadcast/wave", b"forged")
    server.publish(f"{PREFIX}/broadcast/wave", b"real")
    seen = b.wait_for(f"{PREFIX}/broadcast/wave", b"real") + b.drain(QUIET)
    assert [p for _, p in seen] == [b"real"]


def test_remote_commands_reach_only_their_device_and_cannot_be_forged(peers: Any) -> None:
    """Commands: only the server writes a device's ``commands`` and ``upload/req``; only that
    device reads them; a device writes only its own ``commands/resp`` and ``upload/data``."""
    server = _connected(peers(SERVER))
    server.subscribe(f"{PREFIX}/devices/+/commands/resp")
    server.subscribe(f"{PREFIX}/devices/+/upload/data")
    a = _connected(peers("dev-a"))
    b = _connected(peers("dev-b"))
    for leaf in ("commands", "upload/req"):
        a.subscribe(_topic("dev-a", leaf))
        a.subscribe(_topic("dev-b", leaf))  # acknowledged, must deliver nothing
        b.subscribe(_topic("dev-b", leaf))
    b.publish(_topic("dev-a", "commands"), b"forged-by-b")  # a device cannot command another
    a.publish(_topic("dev-a", "commands"), b"self-commanded")  # nor itself
    a.publish(_topic("dev-a", "upload/req"), b"self-requested")
    server.publish(_topic("dev-b", "commands"), b"for-b")
    server.publish(_topic("dev-b", "upload/req"), b"req-b")
    server.publish(_topic("dev-a", "commands"), b"for-a")
    server.publish(_topic("dev-a", "upload/req"), b"req-a")
    assert b.wait_for(_topic("dev-b", "upload/req"), b"req-b")
    seen = a.wait_for(_topic("dev-a", "upload/req"), b"req-a") + a.drain(QUIET)
    assert sorted(p for _, p in seen) == [b"for-a", b"req-a"], seen
    # Answers and upload blocks: a device's own go through, another device's are dropped.
    b.publish(_topic("dev-a", "commands/resp"), b"forged-answer")
    b.publish(_topic("dev-a", "upload/data"), b"forged-block")
    a.publish(_topic("dev-a", "commands/resp"), b"answer")
    a.publish(_topic("dev-a", "upload/data"), b"block")
    got = server.wait_for(_topic("dev-a", "upload/data"), b"block") + server.drain(QUIET)
    assert sorted(p for _, p in got) == [b"answer", b"block"], got


def test_client_without_certificate_cannot_connect(peers: Any) -> None:
    _connected(peers("dev-a"))
    assert not peers("anonymous", "dev-x").connect()


def test_device_cannot_take_over_another_client_id(peers: Any) -> None:
    server = _connected(peers(SERVER))
    server.subscribe(f"{PREFIX}/devices/+/telemetry")
    b = _connected(peers("dev-b"))
    impostor = _connected(peers("dev-a", client_id="dev-b"))  # a's certificate, b's client id
    impostor.publish(_topic("dev-a", "telemetry"), b"from-a")  # still confined to dev-a
    server.wait_for(_topic("dev-a", "telemetry"), b"from-a")
    b.publish(_topic("dev-b", "telemetry"), b"b-alive")
    server.wait_for(_topic("dev-b", "telemetry"), b"b-alive")
    assert b.connected
    assert b.disconnects == 0, "the impostor's connection kicked b's session"


def test_revoked_device_cannot_connect(peers: Any, pki: Pki, broker: Broker) -> None:
    c = peers("dev-c")
    assert c.connect(), "positive control: dev-c connects before revocation"
    c.close()
    serials = pki.ca.revoke("dev-c", now=datetime.now(UTC))
    assert serials
    broker.reload()  # Mosquitto 2.0 re-reads crlfile on SIGHUP; no restart needed
    assert not peers("dev-c", "dev-c-again").connect()
    assert peers("dev-a", "dev-a-after").connect(), "other devices still connect"


# --------------------------------------------------------------------------- consumers
def test_consumer_reads_telemetry_events_status_and_reported_of_every_device(
    peers: Any,
) -> None:
    consumer = _connected(peers(CONSUMER))
    for leaf in ("telemetry", "events", "status", "reported"):
        consumer.subscribe(f"{PREFIX}/devices/+/{leaf}")
    a, b = _connected(peers("dev-a")), _connected(peers("dev-b"))
    for device, peer in (("dev-a", a), ("dev-b", b)):
        for leaf in ("telemetry", "events", "status", "reported"):
            peer.publish(_topic(device, leaf), f"{device}-{leaf}".encode())
            consumer.wait_for(_topic(device, leaf), f"{device}-{leaf}".encode())


def test_consumer_can_share_a_subscription_among_its_workers(peers: Any) -> None:
    consumer = _connected(peers(CONSUMER))
    consumer.subscribe(f"$share/telegraf/{PREFIX}/devices/+/telemetry")
    a = _connected(peers("dev-a"))
    a.publish(_topic("dev-a", "telemetry"), b"shared")
    consumer.wait_for(_topic("dev-a", "telemetry"), b"shared")


def test_consumer_cannot_publish_anywhere(peers: Any) -> None:
    server = _connected(peers(SERVER))
    server.subscribe(f"{PREFIX}/#")
    consumer = _connected(peers(CONSUMER))
    # Device topics of a real device, its own name under the device patterns, the server's.
    for leaf in ("telemetry", "events", "status", "reported", "blocks/req", "fallback/req"):
        consumer.publish(_topic("dev-a", leaf), b"forged")
        consumer.publish(_topic(CONSUMER, leaf), b"forged")
    consumer.publish(_topic("dev-a", "desired"), b"forged")
    consumer.publish(f"{PREFIX}/broadcast/wave", b"forged")
    a = _connected(peers("dev-a"))
    a.publish(_topic("dev-a", "telemetry"), b"marker")  # positive control
    seen = server.wait_for(_topic("dev-a", "telemetry"), b"marker") + server.drain(QUIET)
    assert [x for x in seen if x[1] == b"forged"] == []


def test_consumer_cannot_read_desired_state_acks_or_blocks(peers: Any) -> None:
    server = _connected(peers(SERVER))
    consumer = _connected(peers(CONSUMER))
    consumer.subscribe(f"{PREFIX}/#")
    consumer.subscribe(f"{PREFIX}/broadcast/#")
    consumer.subscribe(_topic("dev-a", "desired"))
    consumer.subscribe(_topic(CONSUMER, "desired"))  # its own name under the device patterns
    for leaf in ("desired", "ack", "blocks/resp", "fallback/resp/1"):
        server.publish(_topic("dev-a", leaf), b"secret")
        server.publish(_topic(CONSUMER, leaf), b"secret")
    server.publish(f"{PREFIX}/broadcast/wave", b"secret")
    a = _connected(peers("dev-a"))
    a.publish(_topic("dev-a", "telemetry"), b"marker")  # positive control on the same session
    seen = consumer.wait_for(_topic("dev-a", "telemetry"), b"marker") + consumer.drain(QUIET)
    assert [x for x in seen if x[1] == b"secret"] == []


def test_broker_refuses_a_message_over_the_size_limit(peers: Any) -> None:
    """A device cannot leave megabytes of retained garbage on its status topic."""
    consumer = _connected(peers(CONSUMER))
    consumer.subscribe(f"{PREFIX}/devices/+/status")
    a = _connected(peers("dev-a"))
    a.client.publish(_topic("dev-a", "status"), b"x" * (6 * 1024 * 1024), qos=0, retain=True)
    a2 = _connected(peers("dev-b"))
    a2.publish(_topic("dev-b", "status"), b"marker")
    seen = consumer.wait_for(_topic("dev-b", "status"), b"marker") + consumer.drain(QUIET)
    assert all(len(p) < 1024 for _, p in seen), [len(p) for _, p in seen]
    late = _connected(peers(CONSUMER, "grafana-late"))  # a new subscriber gets no retained junk
    late.subscribe(_topic("dev-a", "status"))
    assert all(len(p) < 1024 for _, p in late.drain(QUIET))


def test_broker_config_keeps_the_operators_acl_rules(pki: Pki, tmp_path: Path) -> None:
    config = BrokerConfig(port=18883, prefix=PREFIX, server_cn=SERVER)
    files = write_broker_config(tmp_path, pki.ca, config, now=datetime.now(UTC))
    local = tmp_path / "acl.local"
    assert local.exists()
    local.write_text(local.read_text() + "user telegraf.consumer\ntopic read edgefleet/x\n")
    write_broker_config(tmp_path, pki.ca, config, now=datetime.now(UTC))
    acl = files.acl.read_text()
    assert "user telegraf.consumer\ntopic read edgefleet/x" in acl
    assert f"user {CONSUMER}" in acl  # registered consumers are picked up from the CA
    assert "topic read edgefleet/x" in local.read_text()  # never overwritten
    local.write_text("topic readwrite #\n")  # would extend the last generated user
    with pytest.raises(BrokerConfigError):
        write_broker_config(tmp_path, pki.ca, config, now=datetime.now(UTC))
