"""A whole fleet in one test process: real Mosquitto (TLS + ACLs), registry, gateway, agents.

``FleetHarness`` runs the server half in-process (SQLite registry, ``Gateway`` on its own MQTT
session) and starts device agents (a real ``Agent`` serving with onnxruntime plus its
``SyncAgent``) that reach the broker with their own certificates. Helpers publish bundles,
sign and publish desired states exactly as the fleet server does, and wait for conditions.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.bundle import read_raw
from edge_agent.common.logring import LogRing
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.config import AgentConfig, ModelPolicy, StoreConfig, SyncConfig
from edge_agent.contract import BundleManifest
from edge_agent.daemon import ControlLoop, build_device
from edge_agent.serving.agent import Agent
from edge_agent.sync.loop import SyncAgent
from edge_agent.trust.assignment import ModelAssignment
from fleet_server.config import GatewayConfig
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry.store import Registry
from fleet_server.registry.values import BundleRecord, DesiredRecord
from model_builder.keystore import KeyStore
from mosquitto import FleetBroker
from support import wait_until  # noqa: F401  (re-exported: the one condition wait)


@dataclass
class Device:
    """One running device: its agent and sync loop."""

    id: str
    config: AgentConfig
    agent: Agent
    sync: SyncAgent
    control: ControlLoop

    def close(self) -> None:
        self.control.stop.set()
        self.control.join(5)
        self.sync.close()
        self.agent.close()


@dataclass
class FleetHarness:
    """The server half plus helpers; ``close`` stops everything it started."""

    broker: FleetBroker
    keys: KeyStore
    directory: Path
    registry: Registry = field(init=False)
    gateway: Gateway = field(init=False)
    client: MqttClient = field(init=False)
    devices: dict[str, Device] = field(default_factory=dict)
    gateway_config: GatewayConfig | None = None
    bundles_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.registry = Registry.open(f"sqlite:///{self.directory / 'registry.db'}")
        self.registry.upgrade()
        for device in self.broker.creds:
            if not device.endswith(".server"):
                self.registry.enroll(device, group="test")
        self.start_server()

    # ----------------------------------------------------------------- server
    def start_server(self) -> None:
        creds = self.broker.creds[self.broker.server]
        self.client = MqttClient(
            MqttConfig(
                host=self.broker.host,
                port=self.broker.port,
                device_id=self.broker.server,
                ca_path=creds.ca,
                cert_path=creds.cert,
                key_path=creds.key,
                prefix=self.broker.prefix,
                announce_status=False,
                clean_start=False,
                inbox_size=100_000,
                reconnect_max=1.0,
            )
        )
        config = self.gateway_config or GatewayConfig(
            prefix=self.broker.prefix, bundles_dir=self.directory / "bundles"
        )
        self.bundles_dir = config.bundles_dir
        config.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.gateway = Gateway(self.registry, self.client, config)
        self.gateway.start()
        self.client.connect()
        self.client.wait_connected(10)

    def stop_server(self) -> None:
        self.gateway.close()
        self.client.close()

    def publish(self, bundle: Path) -> BundleRecord:
        """Store a bundle file where the gateway serves it and record it in the registry.

        Deliberately not ``fleet_server.delivery.library.BundleLibrary.add``: that refuses bundles
        the
        builder root does not trust, and the tests also play a compromised server that names one.
        """
        data = bundle.read_bytes()
        raw = read_raw(bundle)
        m = BundleManifest.from_bytes(raw.manifest_bytes)
        sha = hashlib.sha256(data).hexdigest()
        shutil.copyfile(bundle, self.bundles_dir / f"{sha}.bundle")
        return self.registry.publish_bundle(
            m.name,
            m.version,
            channel=m.channel,
            sha256=sha,
            length=len(data),
            targets_sha256=hashlib.sha256(raw.targets_bytes).hexdigest(),
        )

    def assign(
        self, device_id: str, bundles: dict[str, BundleRecord], *, now: datetime | None = None
    ) -> DesiredRecord:
        """Sign a desired state naming ``bundles`` with the online key and publish it."""
        models = {
            name: ModelAssignment(b.version, b.channel, b.sha256, b.length, b.targets_sha256)
            for name, b in bundles.items()
        }
        signer = self.keys.signer("online-1")
        when = now or datetime.now(UTC)
        record = self.registry.assign_desired(
            device_id,
            lambda v: sign_desired_state(make_desired_state(device_id, v, models, when), [signer]),
        )
        self.gateway.publish_desired(device_id, record.document)
        return record

    # ----------------------------------------------------------------- devices
    def agent_config(self, device_id: str, **sync: Any) -> AgentConfig:
        return agent_config(self.broker, self.keys, self.directory, device_id, **sync)

    def start_device(self, device_id: str, **sync: Any) -> Device:
        device = start_device(self.agent_config(device_id, **sync))
        self.devices[device_id] = device
        return device

    def stop_device(self, device_id: str) -> None:
        self.devices.pop(device_id).close()

    def close(self) -> None:
        for device_id in list(self.devices):
            self.stop_device(device_id)
        self.stop_server()
        self.registry.close()


def agent_config(
    broker: FleetBroker, keys: KeyStore, directory: Path, device_id: str, **sync: Any
) -> AgentConfig:
    """An agent config for ``device_id`` under ``directory`` with sync to ``broker`` on."""
    home = directory / device_id
    home.mkdir(parents=True, exist_ok=True)
    (home / "root.json").write_bytes(keys.root_bytes())
    return AgentConfig(
        device_id=device_id,
        store=StoreConfig(state_dir=str(home / "state"), root_path=str(home / "root.json")),
        model_defaults=ModelPolicy(probation_requests=5),
        sync=SyncConfig(
            enabled=True,
            host=broker.host,
            port=broker.port,
            identity_dir=str(broker.creds[device_id].cert.parent),
            prefix=broker.prefix,
            reconnect_max_seconds=1.0,
            report_interval_seconds=sync.pop("report_interval_seconds", 0.5),
            ack_timeout_seconds=sync.pop("ack_timeout_seconds", 2.0),
            # the backoff stays on, capped so a test's outage costs seconds, not a minute
            ack_timeout_max_seconds=sync.pop("ack_timeout_max_seconds", 8.0),
            block_retry_seconds=sync.pop("block_retry_seconds", 0.5),
            **sync,
        ),
    )


def start_device(config: AgentConfig, *, log_ring: LogRing | None = None) -> Device:
    """A running agent (real onnxruntime) with its sync loop, wired exactly as the daemon does
    (one MQTT session for sync and, unless ``device_only``, the cloud-fallback transport).
    ``log_ring``: the recent log records its remote ``logs`` command reads."""
    agent, sync_agent = build_device(config, log_ring=log_ring)
    assert sync_agent is not None, "start_device needs [sync] enabled"
    sync_agent.start()
    control = ControlLoop(agent)  # probation verdicts and drift windows, as in the daemon
    control.start()
    return Device(config.device_id, config, agent, sync_agent, control)


def daemon_config(
    broker: FleetBroker,
    keys: KeyStore,
    directory: Path,
    device_id: str,
    api_port: int,
    *,
    sync: str = "",
    extra: str = "",
) -> Path:
    """Write ``<directory>/<device_id>/agent.toml`` for a real ``edge-agent run`` with sync on.

    ``sync`` adds lines to ``[sync]``; ``extra`` adds whole sections (``[drift]``, ...).
    """
    cfg = agent_config(broker, keys, directory, device_id)
    path = directory / device_id / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\n'
        f"[api]\nport = {api_port}\n"
        f'[store]\nstate_dir = "{cfg.store.state_dir}"\nroot_path = "{cfg.store.root_path}"\n'
        "[model_defaults]\nprobation_requests = 5\n"
        f'[sync]\nenabled = true\nhost = "{cfg.sync.host}"\nport = {cfg.sync.port}\n'
        f'identity_dir = "{cfg.sync.identity_dir}"\nprefix = "{cfg.sync.prefix}"\n'
        "reconnect_max_seconds = 1.0\nreport_interval_seconds = 0.5\n"
        f"{sync}{extra}"
    )
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``edge-agent run --config config`` as a process, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "edge-agent"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
