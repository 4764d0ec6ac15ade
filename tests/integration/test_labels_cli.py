"""Labels against real processes: ``fleet-server serve`` (registry, gateway on a real Mosquitto,
rollout engine, admin API with the label routes) driven by the ``fleet-server`` CLI as
subprocesses, as an operator would: label devices, list them by selector and label group,
define a maintenance window, and create a rollout by label group with a disruption budget whose
status shows the held device and when its window opens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundles import DigitsBundles
from fleet import wait_until
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker
from served import served_fleet

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("cam-0", "cam-1", "cam-2")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def test_labels_windows_and_a_held_rollout_through_the_cli(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    with served_fleet(tmp_path, broker, digits_bundles.keys.path) as fleet:
        run = fleet.run
        for v in (1, 2):
            run("models", "publish", str(digits_bundles.path(v)))
        for d, site in zip(DEVICES, ("a", "a", "b"), strict=True):
            run("devices", "register", d, "--group", "line")
            run("devices", "label", d, f"site={site}", "hw=pi5")
        listing = json.loads(run("devices", "list", "--selector", "site=a", "--json").stdout)
        assert [d["id"] for d in listing] == ["cam-0", "cam-1"]
        bad = run("devices", "list", "--selector", "site in (a", code=None)
        assert bad.returncode == 3  # bad input
        assert "(at character 10)" in bad.stderr
        run("label-groups", "define", "cams", "hw=pi5")
        assert "cams" in run("label-groups", "list").stdout
        # A window for site b that is closed now (it opened an hour ago and lasts 30 minutes).
        start = (datetime.now(UTC) - timedelta(hours=1)).strftime("%H:%M")
        run("windows", "set", "b-window", "--selector", "site=b", "--start", start,
            "--duration", "30", "--timezone", "UTC")  # fmt: skip
        assert "b-window" in run("windows", "list").stdout
        created = run("rollouts", "create", "digits", "2", "--label-group", "cams", "--canary", "1",
                      "--budget-label", "site", "--budget-max", "1", "--no-shadow",
                      "--from-version", "1", "--json")  # fmt: skip
        rid = json.loads(created.stdout)["id"]

        def held() -> dict[str, object] | None:
            status = json.loads(run("rollouts", "status", rid, "--json").stdout)
            return status if status.get("holds") else None

        status = wait_until(held, timeout=30, what="the engine starts the rollout and holds")
        assert status["holds"]["cam-2"]["reason"] == "window"  # type: ignore[index]
        assert status["counts"]["waiting_window"] == 1  # type: ignore[index]
        assert status["counts"]["waiting_budget"] == 1  # type: ignore[index]
        text = run("rollouts", "status", rid).stdout
        assert "cam-2 waits for its window, opens" in text
        assert "waits for the disruption budget" in text
