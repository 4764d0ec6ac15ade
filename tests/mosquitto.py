"""A real Mosquitto with TLS, client certificates and the fleet ACLs, for integration tests.

``fleet_broker(directory, devices=...)`` creates a fleet CA, device identities (CSR-based, the
key stays in the device's identity directory) and the server identity, writes the broker
configuration with ``fleet_server.pki.broker_config``, starts ``mosquitto -c`` on a free loopback
port and waits until a TLS handshake with a client certificate succeeds. The returned
``FleetBroker`` can ``stop``/``start`` (same port), ``kill`` (SIGKILL) and ``reload`` (SIGHUP).

As a fixture::

    broker = broker_fixture(scope="module", devices=("dev-a", "dev-b"))

in a test module gives every test a running ``FleetBroker`` (``pytest.skip`` if Mosquitto is
not installed).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.common.identity import IdentityStore
from fleet_server.pki.broker_config import BrokerConfig, BrokerFiles, write_broker_config
from fleet_server.pki.ca import CertificateAuthority
from support import wait_until

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
PREFIX = "edgefleet"
SERVER = "fleet.server"
START_TIMEOUT = 5.0
# What Mosquitto logs (level notice) when SIGHUP makes it re-read its configuration.
RELOADED = "Reloading config."


@dataclass(frozen=True)
class Creds:
    """TLS material of one client: CA bundle, certificate and key paths."""

    ca: Path
    cert: Path
    key: Path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distinct_ports(n: int) -> list[int]:
    """``n`` loopback ports free a moment ago, all different: held open together while chosen
    (``free_port()`` twice can hand out the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class FleetBroker:
    """A Mosquitto process plus the PKI its clients use."""

    directory: Path
    ca: CertificateAuthority
    files: BrokerFiles
    port: int
    creds: dict[str, Creds]
    prefix: str = PREFIX
    server: str = SERVER
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        """Mosquitto's log file (appended across restarts)."""
        return self.directory / "mosquitto.log"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start Mosquitto and wait until it completes a TLS handshake with a client cert."""
        assert MOSQUITTO is not None, "mosquitto is not installed"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.files.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        proc = self.proc

        def accepts() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()}")
            return self._tls_accepts()

        try:
            wait_until(
                accepts, timeout, lambda: f"mosquitto TLS on {self.port}: {self.log.read_text()}"
            )
        except pytest.fail.Exception:
            self.stop()
            raise

    def _tls_accepts(self) -> bool:
        creds = self.creds[self.server]
        ctx = ssl.create_default_context(cafile=str(creds.ca))
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
        try:
            with (
                socket.create_connection((self.host, self.port), 0.5) as raw,
                ctx.wrap_socket(raw, server_hostname=self.host) as tls,
            ):
                tls.do_handshake()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = START_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no will messages sent by the broker itself."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration and the CRL."""
        proc = self.proc
        assert proc is not None
        before = self._reloads()
        proc.send_signal(signal.SIGHUP)
        # Mosquitto logs this in the loop iteration that re-reads the files; a connection made
        # after it is handled by a later iteration, under the new configuration.
        wait_until(
            lambda: proc.poll() is not None or self._reloads() > before,
            START_TIMEOUT,
            lambda: f"mosquitto to reload: {self.log.read_text()}",
        )
        assert proc.poll() is None, self.log.read_text()

    def _reloads(self) -> int:
        return self.log.read_text(errors="replace").count(RELOADED)

    def topic(self, device: str, leaf: str) -> str:
        """``<prefix>/devices/<device>/<leaf>``."""
        return f"{self.prefix}/devices/{device}/{leaf}"


def _make_pki(
    root: Path, devices: tuple[str, ...], server: str, workers: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Creds]]:
    now = datetime.now(UTC)
    ca = CertificateAuthority.init(root / "ca", now=now)
    creds: dict[str, Creds] = {}
    for device in devices:
        store = IdentityStore(root / device)
        store.provision_ca(ca.cert_pem)
        csr = store.write_csr(device)
        store.install_certificate(ca.sign_csr(csr, device, now=now), device, now)
        creds[device] = Creds(store.ca_path, store.cert_path, store.key_path)
    for name in (server, *workers):
        pair = ca.issue_server_identity(name, now=now)
        stem = "server" if name == server else name
        (root / f"{stem}.key").write_bytes(pair.key_pem)
        (root / f"{stem}.crt").write_bytes(pair.cert_pem)
        creds[name] = Creds(ca.cert_path, root / f"{stem}.crt", root / f"{stem}.key")
    return ca, creds


@contextlib.contextmanager
def fleet_broker(
    directory: Path,
    devices: tuple[str, ...] = ("dev-a", "dev-b"),
    *,
    prefix: str = PREFIX,
    server: str = SERVER,
    workers: tuple[str, ...] = (),
    persistence: bool = False,
) -> Iterator[FleetBroker]:
    """A running, TLS-checked fleet broker; stopped on exit. ``workers``: more server CNs."""
    ca, creds = _make_pki(directory / "pki", devices, server, workers)
    port = free_port()
    config = BrokerConfig(
        port=port,
        prefix=prefix,
        server_cn=server,
        worker_cns=workers,
        persistence=persistence,
        run_as_user="root" if os.geteuid() == 0 else None,
    )
    files = write_broker_config(directory / "broker", ca, config, now=datetime.now(UTC))
    broker = FleetBroker(directory, ca, files, port, creds, prefix=prefix, server=server)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def broker_fixture(
    scope: str = "module", devices: tuple[str, ...] = ("dev-a", "dev-b"), **kwargs: Any
) -> Callable[..., Iterator[FleetBroker]]:
    """A pytest fixture yielding a ``FleetBroker``; assign it to a module-level name."""

    @pytest.fixture(scope=scope)
    def _broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetBroker]:
        if MOSQUITTO is None:
            pytest.skip("mosquitto binary not installed (scripts/setup.sh installs it)")
        with fleet_broker(tmp_path_factory.mktemp("mosquitto"), devices, **kwargs) as b:
            yield b

    return _broker


class Peer:
    """A bare paho MQTT v5 client over TLS (the server side in tests) recording what arrives."""

    def __init__(self, broker: FleetBroker, identity: str, client_id: str | None = None) -> None:
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.messages: queue.Queue[Any] = queue.Queue()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        creds = broker.creds[identity]
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or identity,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        c.tls_set(str(creds.ca), str(creds.cert), str(creds.key))
        c.on_connect = lambda *_a: self._connected.set()
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client = c
        c.connect(broker.host, broker.port, keepalive=30)
        c.loop_start()
        assert self._connected.wait(START_TIMEOUT), "peer did not connect"

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(START_TIMEOUT), f"no SUBACK for {topic}"

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = START_TIMEOUT) -> Any:
        """The first received paho message matching ``predicate``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                msg = self.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if predicate(msg):
                return msg
            seen.append((msg.topic, msg.payload))
        pytest.fail(f"no matching message in {timeout}s; got {seen}")

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
