"""A quality-gated rollout against real processes: the degraded canary is caught and undone.

``fleet-server serve`` (a process: registry, MQTT gateway, rollout engine, cloud fallback, admin
API) and six ``edge-agent run`` daemons (enrolled by certificate, fleet sync over MQTT with TLS,
cloud fallback for hard examples) serving traffic on their local v2 APIs. v1 is everywhere; a
rollout of v6 — a mis-normalised build that installs cleanly and passes its golden samples —
starts with a canary of two devices. Their telemetry shows far more hard examples going to the
cloud than the four devices still on v1; the quality gate trips, the rollout aborts, the canaries
go back to v1 and are never given v6 again, and the fleet drift report shows which output
features shifted, and where.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundles import DigitsBundles, misnormalised_bundle
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from fleet import daemon_config, start_daemon, stop_process, wait_until
from fleet_server.admin.client import AdminClient
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker, free_port
from served import TOKEN, server_config

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = tuple(f"line-{i}" for i in range(6))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def _active(client: AdminClient, device: str) -> int | None:
    reported = client.device(device).get("reported") or {}
    model = (reported.get("models") or {}).get("digits") or {}
    active = model.get("active")
    return active if isinstance(active, int) else None


def test_degraded_canary_trips_the_quality_gate_and_is_rolled_back(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    degraded = misnormalised_bundle(digits_bundles, 6, tmp_path)
    config, port = server_config(tmp_path, broker, digits_bundles.keys.path)
    log = (tmp_path / "server.log").open("ab")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "fleet-server"), "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    stop = threading.Event()
    traffic: threading.Thread | None = None
    client = AdminClient(f"http://127.0.0.1:{port}", TOKEN)
    try:
        wait_until(lambda: _ok(client.status), timeout=60, what="fleet-server up")
        for d in DEVICES:
            client.register(d, "line", {}, None)
            ports[d] = free_port()
            cfg = daemon_config(
                broker,
                digits_bundles.keys,
                tmp_path / "devices",
                d,
                ports[d],
                extra=(
                    "[drift]\nwindow_values = 64\nwindow_seconds = 1.0\n"
                    # Hard examples (top probability under 0.9) go to the cloud model.
                    '[fallback]\nmode = "prefer_device"\nmin_confidence = 0.9\n'
                    "deadline_ms = 2000.0\nmax_per_minute = 1000000\n"
                ),
            )
            daemons[d] = start_daemon(cfg, tmp_path / f"{d}.log")
        client.publish(digits_bundles.path(1))
        client.publish(degraded)
        client.assign("line", "digits", 1, group=True)
        for d in DEVICES:
            wait_until(lambda d=d: _active(client, d) == 1, timeout=60, what=f"{d} on v1")
        apis = {d: AgentClient(ApiConfig(port=p), timeout=10) for d, p in ports.items()}

        def drive() -> None:
            x = digits_bundles.x_eval
            i = 0
            while not stop.is_set():
                for api in apis.values():
                    rows = x[(i * 8) % 400 : (i * 8) % 400 + 8]
                    with contextlib.suppress(Exception):  # mid-install: keep driving
                        api.infer("digits", {"input": rows})
                i += 1

        traffic = threading.Thread(target=drive, daemon=True)
        traffic.start()
        created = client.create_rollout(
            {
                "model": "digits",
                "version": 6,
                "group": "line",
                "policy": {
                    "canary_count": 2,
                    "steps": [1.0],
                    "dwell_seconds": 4.0,
                    "min_devices": 2,
                    "min_requests": 50,
                    "on_breach": "abort",
                    "rollback_on_abort": True,
                    # The serving canary's gates are what this test is about: without a shadow
                    # phase (on by default; tests/integration/test_rollout_shadow_fleet.py).
                    "shadow_fraction": None,
                    "thresholds": {"max_p99_latency_ratio": None},
                },
            }
        )
        rollout_id = created["id"]
        assert created["from_version"] == 1

        def finished() -> dict[str, Any] | None:
            r = client.rollout(rollout_id)
            return r if r["state"] in ("aborted", "completed") else None

        try:
            result = wait_until(finished, timeout=90, what="the rollout to end")
        except AssertionError:
            import json

            raise AssertionError(json.dumps(client.rollout(rollout_id), indent=1)[:6000]) from None
        assert result["state"] == "aborted", result
        aborted = [e["detail"] for e in result["events"] if e["detail"].get("state") == "aborted"]
        assert aborted, result["events"]
        # The quality gate that tripped names its measurement (canary vs control).
        breached = [g for g in aborted[0]["gates"] if g["status"] == "breach"]
        assert breached, aborted[0]
        # (output_distribution, added later, compares the canary's answers with the control's too:
        # a mis-normalised model shifts them, so it may trip beside the others)
        assert {g["name"] for g in breached} <= {
            "fallback_rate",
            "prediction_drift",
            "reject_rate",
            "output_distribution",
        }
        assert any("control" in g["detail"] for g in breached)
        canaries = [d for d, s in result["devices"].items() if s != "control"]
        assert len(canaries) == 2, result["devices"]
        # The canaries ran v6, then went back to v1; the control group never left v1.
        for d in canaries:
            wait_until(lambda d=d: _active(client, d) == 1, timeout=60, what=f"{d} back on v1")
            assert 6 in _kept(client, d)  # it did run v6 (kept on disk, rolled back)
        for d in set(DEVICES) - set(canaries):
            assert _kept(client, d) == [1]  # the control group never got v6
        time.sleep(3.0)  # the engine keeps stepping: v6 is never sent again
        for d in canaries:
            desired = client.device(d)["desired"]["digits"]["version"]
            assert desired == 1

        # Fleet drift: v6's predictions drifted on the canaries (output features), v1's did not.
        report = client.drift("digits", version=6, by="device")
        drifted = [f for f in report["drifted"] if f["tensor"] != "input"]
        assert drifted, {k: report[k] for k in ("drifted", "skipped", "devices_scored")} | {
            "cohorts": [
                {k: c[k] for k in ("cohort", "tensor", "windows", "rows", "alert")}
                for c in report["cohorts"]
            ]
        }
        where = {c for f in drifted for c in f["cohorts"]} - {"*"}  # by device: cohort = device
        assert where
        assert where <= set(canaries)
    finally:
        stop.set()
        if traffic is not None:
            traffic.join(10)
        for proc in daemons.values():
            stop_process(proc)
        client.close()
        stop_process(server)
        log.close()


def _kept(client: AdminClient, device: str) -> list[int]:
    reported = client.device(device).get("reported") or {}
    return list(((reported.get("models") or {}).get("digits") or {}).get("kept") or [])


def _ok(call: Any) -> Any:
    try:
        return call()
    except Exception:
        return None
