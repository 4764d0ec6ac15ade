"""Bench plumbing for ``bench_fleet.py``: fleet PKI, a real Mosquitto, and bare paho peers.

Owns: issuing one EC P-256 key and certificate per simulated device (plus the server identity)
from a fresh fleet CA, writing the broker configuration with ``fleet_server.pki.broker_config``
(TLS, client certificates, the fleet ACLs), starting/stopping Mosquitto on a free loopback port
with a raised open-files limit, and the bare paho clients used as same-run baselines (a QoS 1
shared-subscription consumer and a broadcast publisher). Mirrors ``tests/mosquitto.py`` without
importing from ``tests/``.

Device certificates are issued with ``fleet_server.pki.certs.sign_device_csr`` directly rather than
``CertificateAuthority.sign_csr``: the latter rewrites the CA's state file under a lock for
every certificate (quadratic for 1,000 devices) and the broker never reads that file.
Each device gets its own key (generation costs ~0.1 ms), so identities stay distinct.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.common.identity import build_csr
from fleet_server.pki.broker_config import BrokerConfig, BrokerFiles, write_broker_config
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.certs import pem_cert, pem_key, sign_device_csr

PREFIX = "edgefleet"
SERVER = "fleet.server"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
NOFILE = 65536


def raise_nofile(target: int = NOFILE) -> int:
    """Raise this process's open-files soft limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(target, hard) if hard != resource.RLIM_INFINITY else target
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Creds:
    """TLS material of one client."""

    ca: str
    cert: str
    key: str


def device_ids(n: int) -> list[str]:
    """``dev-00000`` ... (valid device ids, one DNS label)."""
    return [f"dev-{i:05d}" for i in range(n)]


def make_pki(root: Path, devices: list[str]) -> tuple[CertificateAuthority, dict[str, Creds]]:
    """A fresh CA, one key + certificate per device, and the server identity."""
    now = datetime.now(UTC)
    ca = CertificateAuthority.init(root / "ca", now=now)
    ca_path = str(ca.cert_path)
    certs = root / "devices"
    certs.mkdir(parents=True)
    creds: dict[str, Creds] = {}
    for device in devices:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = sign_device_csr(
            ca.material, build_csr(key, device), device, now=now, validity=timedelta(days=2)
        )
        (certs / f"{device}.key").write_bytes(pem_key(key))
        (certs / f"{device}.crt").write_bytes(pem_cert(cert))
        creds[device] = Creds(ca_path, str(certs / f"{device}.crt"), str(certs / f"{device}.key"))
    pair = ca.issue_server_identity(SERVER, now=now)
    (root / "server.key").write_bytes(pair.key_pem)
    (root / "server.crt").write_bytes(pair.cert_pem)
    creds[SERVER] = Creds(ca_path, str(root / "server.crt"), str(root / "server.key"))
    return ca, creds


@dataclass
class Broker:
    """A Mosquitto process with the fleet configuration; ``start``/``stop``/``restart``."""

    directory: Path
    files: BrokerFiles
    port: int
    server: Creds
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, directory: Path, ca: CertificateAuthority, server: Creds) -> Broker:
        port = free_port()
        config = BrokerConfig(
            port=port,
            prefix=PREFIX,
            server_cn=SERVER,
            run_as_user="root" if os.geteuid() == 0 else None,
        )
        files = write_broker_config(directory / "broker", ca, config, now=datetime.now(UTC))
        return cls(directory, files, port, server)

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto (open-files limit raised) and wait for a TLS handshake."""

        def _limits() -> None:  # runs in the child before exec: Mosquitto needs >1 fd/client
            raise_nofile()

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.files.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_limits,  # noqa: PLW1509 - no threads hold locks we need here
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            if self._tls_accepts():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept TLS on {self.port}")

    def _tls_accepts(self) -> bool:
        ctx = ssl.create_default_context(cafile=self.server.ca)
        ctx.load_cert_chain(self.server.cert, self.server.key)
        try:
            with (
                socket.create_connection((self.host, self.port), 0.5) as raw,
                ctx.wrap_socket(raw, server_hostname=self.host) as tls,
            ):
                tls.do_handshake()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds Mosquitto has used (from /proc)."""
        if self.proc is None:
            return 0.0
        return proc_cpu_seconds(self.proc.pid)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, float]:
    """Resident memory (MiB, now and peak), threads, open file descriptors and their soft limit
    of a process."""
    out = {"rss_mib": 0.0, "peak_rss_mib": 0.0, "threads": 0.0, "fds": 0.0, "nofile": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = float(line.split()[1])
        out["fds"] = float(sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()))
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                out["nofile"] = float(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return out


def host_load() -> dict[str, float]:
    """The whole host, other tenants included: 1-minute load average and the share of the
    last 10 s in which some runnable task waited for a CPU (``/proc/pressure/cpu``)."""
    out = {"loadavg_1m": 0.0, "cpu_pressure_10s": 0.0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        out["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        out["cpu_pressure_10s"] = float(some[1].split("=")[1])
    return out


def bare_client(broker: Broker, client_id: str) -> Any:
    """A bare paho MQTT v5 TLS client with the server identity (not connected)."""
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.tls_set(broker.server.ca, broker.server.cert, broker.server.key)
    return c


class BareConsumer:
    """A bare paho QoS 1 shared-subscription consumer that only counts (the ingest baseline)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self._ready = threading.Event()
        c = bare_client(broker, SERVER)
        c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_a: self._ready.set()
        c.on_message = self._on_message
        self.client = c
        c.connect(broker.host, broker.port, keepalive=30)
        c.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise RuntimeError("bare consumer did not subscribe")

    def _on_message(self, _c: Any, _u: Any, _msg: Any) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def bare_broadcast(broker: Broker, topic: str, blocks: list[bytes]) -> float:
    """Publish ``blocks`` QoS 1 on ``topic`` with bare paho; return when all are PUBACKed."""
    c = bare_client(broker, SERVER)
    c.max_inflight_messages_set(64)
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("bare publisher did not connect")
        t0 = time.time()
        infos = [c.publish(topic, block, qos=1) for block in blocks]
        for info in infos:
            info.wait_for_publish(60)
        return time.time() - t0
    finally:
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
