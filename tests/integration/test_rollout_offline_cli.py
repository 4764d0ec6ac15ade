"""The offline comparison against real processes: ``fleet-server serve`` (registry, gateway on a
real Mosquitto, rollout engine, admin API) driven by the ``fleet-server`` CLI as subprocesses.

Without an evaluation set a rollout proceeds and says so in ``rollouts status``. After
``evalsets add`` (listed and shown with its provenance), ``rollouts create`` of a confidently
wrong candidate (most 3s trained as 8s) exits 5 naming class 3; with ``--override-offline`` it
is created and ``rollouts status`` shows the regression and the recorded reason; a good
candidate passes with its comparison shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles import DigitsBundles
from evalset_support import digits_eval_set, wrong_candidate
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker
from served import served_fleet

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("line-0", "line-1", "line-2")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def test_the_offline_check_refuses_a_wrong_candidate_through_the_cli(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    wrong = wrong_candidate(digits_bundles, 6, tmp_path)
    eval_set = digits_eval_set(digits_bundles, tmp_path / "digits-eval.npz")
    with served_fleet(tmp_path, broker, digits_bundles.keys.path) as fleet:
        run = fleet.run
        for path in (*(digits_bundles.path(v) for v in (1, 2, 3)), wrong):
            run("models", "publish", str(path))
        for d in DEVICES:
            run("devices", "register", d, "--group", "line")
        create = ("rollouts", "create", "digits", "--group", "line", "--from-version", "1")

        def create_args(version: int, *extra: str) -> list[str]:
            return [*create[:3], str(version), *create[3:], *extra]

        # No evaluation set: the rollout proceeds and its record says so.
        first = json.loads(run(*create_args(3, "--json")).stdout)
        assert first["offline"]["verdict"] == "no_eval_set"
        assert "offline no evaluation set" in run("rollouts", "status", first["id"]).stdout
        run("rollouts", "abort", first["id"])

        added = run(
            "evalsets", "add", "--model", "digits", str(eval_set),
            "--source", "sklearn digits held-out split", "--note", "labelled twice",
        ).stdout  # fmt: skip
        assert f"{len(digits_bundles.y_eval)} samples, 10 classes" in added
        listing = run("evalsets", "list", "--model", "digits").stdout.splitlines()
        assert listing[0].split()[:3] == ["SHA256", "MODEL", "SAMPLES"]
        assert listing[1].split()[1:3] == ["digits", str(len(digits_bundles.y_eval))]
        sha = added.split()[2]
        shown = run("evalsets", "show", sha).stdout
        assert "source      sklearn digits held-out split" in shown
        assert "note        labelled twice" in shown
        refused_add = run(
            "evalsets", "add", "--model", "digits", str(wrong), "--source", "x", code=3
        )
        assert "422: evaluation set refused: not an .npz" in refused_add.stderr

        # The confidently wrong candidate is refused, typed, with the class that broke.
        refused = run(*create_args(6), code=5)
        said = refused.stdout + refused.stderr
        assert "error[offline_regression]: 409" in said
        assert "class 3 recall" in said
        assert "as class 8" in said
        assert "--override-offline" in said

        # Overridden: created, and the status says what was overridden and why.
        overridden = json.loads(
            run(*create_args(6, "--override-offline", "line 4 sees no 3s", "--json")).stdout
        )
        assert overridden["offline"]["verdict"] == "overridden"
        assert overridden["offline"]["eval_set"] == sha
        assert {"kind": "offline", "reason": "line 4 sees no 3s"} in overridden["overrides"]
        status = run("rollouts", "status", overridden["id"]).stdout
        assert f"offline REGRESSED, overridden on evaluation set {sha[:12]}" in status
        assert "override: line 4 sees no 3s" in status
        assert "class 3 recall" in status
        run("rollouts", "abort", overridden["id"])

        # A good candidate passes; the comparison is shown.
        good = run(*create_args(2)).stdout
        assert "offline passed on evaluation set" in good
        assert "disagreement 0.0%" in good
