"""Memory of failure against real processes: ``fleet-server serve`` (registry, gateway on a real
Mosquitto, rollout engine, admin API) driven by the ``fleet-server`` CLI as subprocesses, as an
operator would. An aborted version shows its abort in ``models list`` and ``models show``; a
second ``rollouts create`` is refused until overridden with a reason; the second abort
quarantines the version, and the history says so. A direct ``assign`` (no waves, no gates)
is refused by the same memory unless overridden, and the override is logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles import DigitsBundles
from fleet import wait_until
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker
from served import served_fleet

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("line-0", "line-1", "line-2")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def test_an_aborted_version_carries_its_history(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    with served_fleet(tmp_path, broker, digits_bundles.keys.path) as fleet:
        run = fleet.run
        for v in (1, 2):
            run("models", "publish", str(digits_bundles.path(v)))
        for d in DEVICES:
            run("devices", "register", d, "--group", "line")
        create = ("rollouts", "create", "digits", "2", "--group", "line", "--canary-count", "1")
        first = json.loads(run(*create, "--json").stdout)["id"]
        wait_until(
            lambda: (
                json.loads(run("rollouts", "status", first, "--json").stdout)["state"] != "pending"
            ),
            timeout=30,
            what="the engine starts the rollout",
        )
        run("rollouts", "abort", first)

        listing = run("models", "list").stdout.splitlines()
        assert listing[0].split()[-1] == "HISTORY"
        row = {line.split()[1]: line for line in listing[1:]}
        assert row["2"].rstrip().endswith("aborted 1x")
        assert row["1"].rstrip().endswith("-")
        shown = run("models", "show", "digits", "2").stdout
        assert "history: aborted (aborted 1x)" in shown
        assert f"by operator (rollout {first})" in shown

        refused = run(*create, code=None)
        assert refused.returncode == 3  # EXIT_BAD_INPUT: the request is refused, typed
        assert "aborted 1 time" in refused.stdout + refused.stderr
        # A direct assignment skips the waves and gates: the same memory applies to it.
        assign = ("assign", "digits", "2", "--group", "line")
        refused = run(*assign, code=None)
        assert refused.returncode == 3
        assert "aborted 1 time" in refused.stdout + refused.stderr
        second = json.loads(
            run(*create, "--override-aborted", "canary line fixed", "--json").stdout
        )
        assert second["overrides"] == [{"kind": "aborted", "reason": "canary line fixed"}]
        run("rollouts", "abort", second["id"])

        history = json.loads(run("models", "list", "--json").stdout)
        [v2] = [m["history"] for m in history if m["version"] == 2]
        assert (v2["status"], len(v2["aborts"]), v2["rollouts"]) == ("quarantined", 2, 2)
        assert v2["summary"] == "quarantined, aborted 2x, 1 override(s)"
        assert "quarantined" in run("models", "show", "digits", "2").stdout
        refused = run(*create, "--override-aborted", "again", code=None)
        assert "quarantined" in refused.stdout + refused.stderr
        refused = run(*assign, "--override-aborted", "again", code=None)
        assert "quarantined" in refused.stdout + refused.stderr
        assigned = json.loads(
            run(*assign, "--override-quarantine", "bench line only", "--json").stdout
        )
        assert sorted(r["device_id"] for r in assigned) == sorted(DEVICES)
        assert "overrides its quarantine history: bench line only" in (
            tmp_path / "server.log"
        ).read_text(errors="replace")
        run(*create, "--override-quarantine", "known issue, hotfix on the way")
