"""Two fleet-server workers on one PostgreSQL and one broker; the leader is SIGKILLed under load.

Each worker is a real ``fleet-server serve`` process with its own certificate (its own client
id), sharing the telemetry subscription. Mosquitto does not hand a dead shared-subscription
member's backlog to the others, so what that worker had not stored is lost at the broker: the
devices' end-to-end acknowledgement is what makes the death harmless. The killed worker is the
one running the rollout engine (it holds the PostgreSQL advisory lock): the survivor takes the
lock over and completes the rollout. The test shows every telemetry item of every device stored
exactly once, none lost, and the rollout finished.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles import DigitsBundles
from fleet import Device, agent_config, start_device, wait_until
from fleet_server.admin.client import AdminClient
from fleet_server.registry.store import Registry
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker, free_port
from pg import PgCluster

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
WORKERS = ("fleet.server", "fleet-2.server")
TOKEN = "scale-out-test-token-0123456789"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES, workers=WORKERS[1:]) as b:
        yield b


def _worker_config(
    directory: Path, broker: FleetBroker, identity: str, url: str, keys_dir: Path
) -> tuple[Path, int]:
    creds = broker.creds[identity]
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(TOKEN)
    path = directory / "server.toml"
    path.write_text(
        f'[registry]\nstate_dir = "{directory}"\nurl = "{url}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nca_path = "{creds.ca}"\n'
        f'cert_path = "{creds.cert}"\nkey_path = "{creds.key}"\nclient_id = "{identity}"\n'
        f'[gateway]\nprefix = "{broker.prefix}"\nbundles_dir = "{directory.parent / "bundles"}"\n'
        f'[api]\nport = {port}\ntoken_file = "{directory / "token"}"\n'
        f'[signing]\nonline_key = "{keys_dir / "keys" / "online-1.pem"}"\n'
        f'root_path = "{keys_dir / "root.json"}"\n'
    )
    return path, port


def _active(client: AdminClient, device: str) -> int | None:
    reported = client.device(device).get("reported") or {}
    active = ((reported.get("models") or {}).get("digits") or {}).get("active")
    return active if isinstance(active, int) else None


def test_killing_the_leader_worker_loses_nothing_and_the_rollout_goes_on(
    broker: FleetBroker, pg: PgCluster, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    url = pg.new_database()
    registry = Registry.open(url)
    registry.upgrade()
    for d in DEVICES:
        registry.enroll(d, group="test")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    ports: list[int] = []
    devices: dict[str, Device] = {}
    try:
        for identity in WORKERS:
            config, port = _worker_config(
                tmp_path / identity, broker, identity, url, digits_bundles.keys.path
            )
            ports.append(port)
            logs.append(tmp_path / f"{identity}.log")
            with logs[-1].open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [str(Path(sys.executable).parent / "fleet-server"), "serve",
                         "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
        clients = [AdminClient(f"http://127.0.0.1:{p}", TOKEN) for p in ports]
        for client in clients:
            wait_until(lambda c=client: _try(c.status), timeout=60, what="worker up")

        def start(report_interval: float) -> None:
            for d in DEVICES:
                cfg = agent_config(
                    broker,
                    digits_bundles.keys,
                    tmp_path / "devices",
                    d,
                    report_interval_seconds=report_interval,
                    ack_timeout_seconds=1.0,
                )
                devices[d] = start_device(cfg)

        start(0.05)  # a report per sync tick (5/s) from each of four devices
        admin = clients[0]
        admin.publish(digits_bundles.path(1))
        admin.publish(digits_bundles.path(2))
        admin.assign("test", "digits", 1, group=True)
        for d in DEVICES:
            wait_until(lambda d=d: _active(admin, d) == 1, timeout=60, what=f"{d} on v1")
        rollout = admin.create_rollout(
            {
                "model": "digits",
                "version": 2,
                "group": "test",
                "policy": {
                    "canary_count": 2,
                    "steps": [1.0],
                    "dwell_seconds": 3.0,
                    "min_devices": 1,
                    "shadow_fraction": None,  # the canary wave at once (no shadow phase)
                    "thresholds": {
                        "max_reject_rate_increase": None,
                        "max_fallback_rate_increase": None,
                        "max_drift_alert_share": None,
                        "max_p99_latency_ratio": None,
                    },
                },
            }
        )
        wait_until(
            lambda: all(_inserted(c) > 0 for c in clients), timeout=30, what="both workers store"
        )
        wait_until(
            lambda: len(admin.rollout(rollout["id"])["members"]) == 2,
            timeout=30,
            what="the canary wave",
        )
        leader = wait_until(lambda: _leader(logs), timeout=30, what="a leader")[0]
        procs[leader].send_signal(signal.SIGKILL)  # the rollout engine's worker, mid-load
        procs[leader].wait(10)
        survivor = clients[1 - leader]
        # Devices keep sending; the survivor alone stores now (resends of what the dead one took).
        alone_from = _inserted(survivor)
        wait_until(
            lambda: _inserted(survivor) > alone_from, timeout=30, what="the survivor storing alone"
        )
        # The survivor takes the leader lock over and finishes the rollout.
        wait_until(
            lambda: survivor.rollout(rollout["id"])["state"] == "completed",
            timeout=90,
            what="the rollout to complete on the surviving worker",
        )
        for d in DEVICES:
            wait_until(lambda d=d: _active(survivor, d) == 2, timeout=60, what=f"{d} on v2")
        assert "leader for rollout-engine" in logs[1 - leader].read_text()
        resends = sum(dev.sync.uplink.stats().resends for dev in devices.values())
        print(f"batches resent after the kill: {resends}")
        for d in list(devices):
            devices.pop(d).close()
        start(3600.0)  # restarted agents drain their on-disk outboxes, nothing new is made
        for d in DEVICES:
            wait_until(
                lambda d=d: devices[d].sync.outbox.stats().entries == 0,
                timeout=60,
                what=f"{d}'s outbox drained",
            )
        for d in DEVICES:
            # Two workers store batches in any order; what matters is each seq exactly once.
            seqs = sorted(t.seq for t in registry.telemetry(device_id=d, limit=10_000))
            assert len(seqs) >= 10
            assert len(seqs) == len(set(seqs)), f"{d}: stored twice"
            assert seqs == list(range(1, len(seqs) + 1)), f"{d}: a seq was lost"
            state = registry.seq_state(d)
            assert state.lost == 0
            assert state.gaps == 0
            assert state.acked_upto == len(seqs)
    finally:
        for device in devices.values():
            device.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        registry.close()


def _leader(logs: list[Path]) -> list[int]:
    """Indexes of the workers whose log says they took the rollout engine's lock."""
    return [i for i, log in enumerate(logs) if "leader for rollout-engine" in log.read_text()]


def _try(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except Exception:
        return None


def _inserted(client: AdminClient) -> int:
    status = _try(client.status)
    if not isinstance(status, dict):
        return 0
    return int(status.get("gateway", {}).get("items_inserted", 0))
