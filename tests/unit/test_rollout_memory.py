"""Memory of failure: aborts and quarantines stay in a version's history, a quarantined or
aborted version needs an operator's override with a reason, two aborts quarantine at once.

Pure admission table, then the runner over a real SQLite registry (``tests/rollout_memory.py``'s
scenario, which runs on PostgreSQL too: ``tests/integration/test_rollout_memory_postgres.py``),
the admin routes and the CLI through the in-process admin API.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from test_rollout_runner import World, api, cli, world  # noqa: F401  (fixtures)

from fleet_server.errors import AbortedVersionError, QuarantinedVersionError, RolloutPolicyError
from fleet_server.registry import rollouts as store
from fleet_server.registry.version_history import version_history
from fleet_server.rollouts.admission import MAX_OVERRIDE_REASON, Override, admit
from fleet_server.rollouts.policy import RolloutPolicy
from rollout_memory import LINE, memory_scenario


# --------------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    ("quarantined", "aborts", "oq", "oa", "want"),
    [
        (None, 0, "", "", ()),
        (None, 0, "why", "", ()),  # nothing to override: nothing recorded
        (None, 1, "", "", AbortedVersionError),
        (None, 3, "", "fixed the labels", (Override("aborted", "fixed the labels"),)),
        (None, 1, "q reason", "", (Override("aborted", "q reason"),)),
        ("2 aborts", 2, "", "", QuarantinedVersionError),
        ("2 aborts", 2, "", "only aborted", QuarantinedVersionError),
        ("2 aborts", 2, "  known risk ", "", (Override("quarantine", "known risk"),)),
        ("2 aborts", 0, "   ", "", QuarantinedVersionError),  # blank is no reason
    ],
)
def test_admission_table(
    quarantined: str | None, aborts: int, oq: str, oa: str, want: object
) -> None:
    def run() -> object:
        return admit(
            "digits",
            2,
            quarantine_reason=quarantined,
            aborts=aborts,
            override_quarantine=oq,
            override_aborted=oa,
        )

    if isinstance(want, type):
        with pytest.raises(want, match="override"):
            run()
    else:
        assert run() == want


@pytest.mark.parametrize("reason", ["", "   ", "a\nb", "\x00", "x" * (MAX_OVERRIDE_REASON + 1)])
def test_an_override_needs_a_printable_reason(reason: str) -> None:
    with pytest.raises(RolloutPolicyError):
        Override("quarantine", reason)
    with pytest.raises(RolloutPolicyError):
        Override("anything", "fine")


# --------------------------------------------------------------------------- runner
def test_memory_of_failure_on_sqlite(world: World) -> None:  # noqa: F811
    memory_scenario(world.registry, world.runner, lambda: world.runner.step() and None)


def test_a_gate_abort_and_an_operator_abort_are_told_apart(world: World) -> None:  # noqa: F811
    w = world
    policy = RolloutPolicy(canary_count=2, steps=(0.5, 1.0), on_breach="abort")
    r = w.runner.create("digits", 2, selector=LINE, policy=policy)
    [d] = w.runner.step()
    for victim in sorted(d.assign):  # both canaries: a safety gate breach, abort
        w.install(victim, 1, 2, outcome="rolled_back")
    w.runner.step()
    assert store.get_rollout(w.registry, r.id).state == "aborted"
    [h] = version_history(w.registry).values()
    assert [a["by"] for a in h.aborts] == ["gate"]
    assert any("rollback" in reason for reason in h.aborts[0]["reasons"])


# --------------------------------------------------------------------------- admin + CLI
def test_admin_routes_refuse_override_and_show_history(
    world: World,  # noqa: F811
    api: TestClient,  # noqa: F811
) -> None:
    body = {"model": "digits", "version": 2, "group": "line-3", "policy": {"canary_count": 2}}
    rid = api.post("/v1/rollouts", json=body).json()["id"]
    world.runner.step()
    assert api.post(f"/v1/rollouts/{rid}/abort").status_code == 200
    again = api.post("/v1/rollouts", json=body)
    assert (again.status_code, again.json()["code"]) == (409, "version_aborted")
    too_long = api.post("/v1/rollouts", json={**body, "override_aborted": "x" * 600})
    assert (too_long.status_code, too_long.json()["code"]) == (400, "rollout_policy_invalid")
    ok = api.post("/v1/rollouts", json={**body, "override_aborted": "retry: broker was down"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["overrides"] == [{"kind": "aborted", "reason": "retry: broker was down"}]
    shown = api.get("/v1/models/digits/2").json()
    assert (shown["name"], shown["version"]) == ("digits", 2)
    assert shown["history"]["status"] == "aborted"
    assert [a["rollout"] for a in shown["history"]["aborts"]] == [rid]
    assert [o["reason"] for o in shown["history"]["overrides"]] == ["retry: broker was down"]
    assert sorted(r["state"] for r in shown["rollouts"]) == ["aborted", "pending"]
    assert api.get("/v1/models/digits/1").json()["history"]["status"] == "clean"
    assert api.get("/v1/models/digits/9").status_code == 404
    assert api.get("/v1/models/digits/x").status_code == 400


def test_cli_create_is_refused_after_an_abort_unless_overridden(
    world: World,  # noqa: F811
    cli: click.Group,  # noqa: F811
) -> None:
    def invoke(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(
            cli, ["rollouts", args[0], "--url", "http://testserver", "--token", "t", *args[1:]]
        )
        return res.exit_code, res.output + repr(res.exception)

    create = ("create", "digits", "2", "--group", "line-3", "--canary-count", "2", "--json")
    code, out = invoke(*create)
    assert code == 0, out
    rid = json.loads(out.split("None")[0])["id"]
    assert invoke("abort", rid)[0] == 0
    code, out = invoke(*create)
    assert code != 0
    assert "version_aborted" in out or "aborted 1 time" in out
    code, out = invoke(*create[:-1], "--override-aborted", "canary hardware fixed")
    assert code == 0, out
    assert "override of aborted recorded: canary hardware fixed" in out
