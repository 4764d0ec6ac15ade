"""A stolen builder key is revoked by rotating the root, end to end, with real processes.

Real Mosquitto (TLS, ACLs), ``fleet-server serve``, two ``edge-agent run`` daemons on real
onnxruntime, and the operators' commands run as processes: ``model-builder keys rotate`` removes
the compromised builder key and adds a new one (root v2, signed by the root key); ``fleet-server
root rotate`` hands v2 to the server, which checks it as a device will, verifies bundles with it
from then on and re-publishes every device's desired state with the chain beside it; the devices
walk the chain (v1 -> v2, old and new thresholds) and persist it. Then: a bundle signed by the
new key is published and installed everywhere; bundles signed by the stolen key are refused by
the server and by the devices (``edge-agent install``); root versions that skip a version or
are signed only by new root keys are refused (``edge-agent root update``, ``fleet-server root
rotate``, and over MQTT from a compromised server identity holding the online key); and the
rotation survives a daemon restart.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root

from bundles import DigitsBundles
from edge_agent.bundle import read_bundle
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.trust import TrustedRoot
from edge_agent.wire.topics import Topics
from fleet import daemon_config, start_daemon, stop_process, wait_until
from fleet_server.admin.client import AdminClient
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.errors import AdminRequestError
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker, free_port

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("rot-1", "rot-2")
TOKEN = "root-rotation-admin-token-0123456789"
BIN = Path(sys.executable).parent
EVIL = "evil.server"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    # A second server identity: what an attacker holding a server credential can publish.
    with fleet_broker(tmp_path / "mqtt", DEVICES, workers=(EVIL,)) as b:
        yield b


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def _bundle(src: DigitsBundles, keys: KeyStore, version: int, out: Path, **kw: Any) -> Path:
    """The real digits model, signed under the test's own (rotatable) key store."""
    good = read_bundle(
        src.path(1),
        src.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    manifest = dataclasses.replace(good.manifest, version=version)
    path = out / f"digits-{version}.efb"
    path.write_bytes(package_bundle(manifest, good.artifact, keys, now=datetime.now(UTC), **kw))
    return path


def _server_config(tmp_path: Path, broker: FleetBroker, keys: KeyStore) -> tuple[Path, int]:
    creds = broker.creds[broker.server]
    port = free_port()
    (tmp_path / "token").write_text(TOKEN)
    provisioned = tmp_path / "provisioned-root.json"  # v1: what the fleet was set up with
    provisioned.write_bytes(keys.root_chain()[0])
    path = tmp_path / "server.toml"
    path.write_text(
        f'[registry]\nstate_dir = "{tmp_path / "server"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nca_path = "{creds.ca}"\n'
        f'cert_path = "{creds.cert}"\nkey_path = "{creds.key}"\n'
        f'[gateway]\nprefix = "{broker.prefix}"\n'
        f'[api]\nport = {port}\ntoken_file = "{tmp_path / "token"}"\n'
        f'[signing]\nonline_key = "{keys.path / "keys" / "online-1.pem"}"\n'
        f'root_path = "{provisioned}"\n'
    )
    return path, port


def _ok(call: Any) -> Any:
    try:
        return call()
    except Exception:
        return None


def _active(client: AdminClient, device: str) -> int | None:
    reported = client.device(device).get("reported") or {}
    active = ((reported.get("models") or {}).get("digits") or {}).get("active")
    return active if isinstance(active, int) else None


def _publish_as(
    identity: str, broker: FleetBroker, keys: KeyStore, device: str, roots: list[bytes]
) -> None:
    """A desired state signed with the online key, ``roots`` beside it, on ``device``'s topic."""
    creds = broker.creds[identity]
    client = MqttClient(
        MqttConfig(
            host=broker.host,
            port=broker.port,
            device_id=identity,
            ca_path=creds.ca,
            cert_path=creds.cert,
            key_path=creds.key,
            prefix=broker.prefix,
            announce_status=False,
        )
    )
    client.connect()
    try:
        client.wait_connected(10)
        state = make_desired_state(device, 10_000, {}, datetime.now(UTC), timedelta(hours=1))
        message = sign_desired_state(state, [keys.signer("online-1")], roots)
        client.publish(Topics(broker.prefix).device_desired(device), message, 1, True)
    finally:
        client.close()


def _device_root(home: Path) -> int:
    return TrustedRoot.from_bytes((home / "state" / "trust" / "root.json").read_bytes()).version


def test_a_stolen_builder_key_is_rotated_out_of_a_running_fleet(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    stolen = next(k.keyid for k in keys.list_keys() if k.label == "targets-1")
    v1 = _bundle(digits_bundles, keys, 1, tmp_path)
    # What the thief signs with targets-1 (identical bytes whenever it is made).
    forged = _bundle(digits_bundles, keys, 3, tmp_path, key_labels=["targets-1"])
    config, port = _server_config(tmp_path, broker, keys)
    server = subprocess.Popen(
        [str(BIN / "fleet-server"), "serve", "--config", str(config)],
        stdout=(tmp_path / "server.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    configs: dict[str, Path] = {}
    client = AdminClient(f"http://127.0.0.1:{port}", TOKEN)
    admin = ("--url", f"http://127.0.0.1:{port}", "--token", TOKEN)
    try:
        wait_until(lambda: _ok(client.status), timeout=60, what="fleet-server up")
        for d in DEVICES:
            client.register(d, "line", {}, None)
            configs[d] = daemon_config(broker, keys, tmp_path / "devices", d, free_port())
            daemons[d] = start_daemon(configs[d], tmp_path / f"{d}.log")
        client.publish(v1)
        client.assign("line", "digits", 1, group=True)
        for d in DEVICES:
            wait_until(lambda d=d: _active(client, d) == 1, timeout=60, what=f"{d} on v1")

        # The builder key is stolen: the root key holders write root v2 without it.
        out = _run(
            BIN / "model-builder", "keys", "rotate", keys.path, "--role", "targets",
            "--remove", "targets-1", "--add", "1",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        v2_file = keys.path / "roots" / "2.root.json"
        out = _run(BIN / "fleet-server", "root", "rotate", *admin, v2_file)
        assert out.returncode == 0, out.stderr
        assert "v1 -> v2" in out.stdout
        for d in DEVICES:
            home = tmp_path / "devices" / d
            wait_until(lambda h=home: _device_root(h) == 2, timeout=60, what=f"{d} on root v2")

        # New bundles signed by the new key flow; the stolen key's are refused everywhere.
        with pytest.raises(AdminRequestError, match="not trusted"):
            client.publish(forged)
        client.publish(_bundle(digits_bundles, keys, 2, tmp_path))
        client.assign("line", "digits", 2, group=True)
        for d in DEVICES:
            wait_until(lambda d=d: _active(client, d) == 2, timeout=60, what=f"{d} on v2")
        out = _run(BIN / "edge-agent", "install", forged, "--config", configs["rot-1"])
        assert out.returncode == 4, (out.stdout, out.stderr)
        assert "signature" in out.stderr.lower() or "threshold" in out.stderr.lower()

        # Root versions that skip one, or that only the new root keys signed, are refused.
        keys.rotate("targets", now=datetime.now(UTC), add=1)  # v3
        keys.rotate("root", now=datetime.now(UTC), add=1)  # v4 adds root-2 (threshold 1)
        skip = keys.path / "roots" / "4.root.json"
        out = _run(BIN / "edge-agent", "root", "update", skip, "--config", configs["rot-1"])
        assert out.returncode == 4, (out.stdout, out.stderr)
        assert "does not follow" in out.stderr
        md = Metadata[Root].from_bytes((keys.path / "roots" / "3.root.json").read_bytes())
        md.signatures.clear()
        md.sign(keys.signer("root-2"))  # a key root v2 does not know
        only_new = tmp_path / "3-only-new.root.json"
        only_new.write_bytes(md.to_bytes())
        out = _run(BIN / "edge-agent", "root", "update", only_new, "--config", configs["rot-1"])
        assert out.returncode == 4, (out.stdout, out.stderr)
        assert "current root keys" in out.stderr
        out = _run(BIN / "fleet-server", "root", "rotate", *admin, only_new)
        assert out.returncode != 0
        assert "current root keys" in out.stderr
        assert _device_root(tmp_path / "devices" / "rot-1") == 2

        # The rotation survives a restart; the model signed by the new key still serves.
        stop_process(daemons["rot-1"])
        daemons["rot-1"] = start_daemon(configs["rot-1"], tmp_path / "rot-1.log")
        out = _run(BIN / "edge-agent", "root", "show", "--json", "--config", configs["rot-1"])
        shown = json.loads(out.stdout)
        assert shown["version"] == 2
        assert stolen not in shown["roles"]["targets"]["keyids"]
        wait_until(
            lambda: "\n".join(
                _run(BIN / "edge-agent", "status", "--config", configs["rot-1"]).stdout.splitlines()
            ).startswith("daemon: ready"),
            timeout=60,
            what="rot-1 ready again",
        )
        out = _run(BIN / "edge-agent", "install", forged, "--config", configs["rot-1"])
        assert out.returncode == 4

        # Over MQTT: a compromised server (its credential and online key) ships a chain whose
        # v3 only the new root key signed. rot-2 keeps root v2 and says so.
        _publish_as(EVIL, broker, keys, "rot-2", [v2_file.read_bytes(), only_new.read_bytes()])
        status = tmp_path / "devices" / "rot-2" / "state" / "sync" / "status.json"
        wait_until(
            lambda: json.loads(status.read_text())["counts"].get("roots_rejected") == 1,
            timeout=60,
            what="rot-2 refusing the chain",
        )
        assert _device_root(tmp_path / "devices" / "rot-2") == 2
        assert "root chain refused" in (tmp_path / "rot-2.log").read_text()
    finally:
        client.close()
        for proc in daemons.values():
            stop_process(proc)
        stop_process(server)
