"""Labels, label groups and maintenance windows through the admin API (the real app and
guard, Starlette's TestClient) and the ``fleet-server`` CLI over it: set and show labels,
devices listed by selector and label group, groups and windows, hostile bodies and queries,
and a rollout created with a selector, a label group and a disruption budget whose status
shows who waits for a window."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from bundles import DigitsBundles
from clock import FakeClock
from edge_agent.wire.reported import ModelReport, ReportedState
from fakes import FakeGateway
from fleet_server.admin import client as admin_client
from fleet_server.admin.api import create_app
from fleet_server.admin.ops.labels import label_routes
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.cli import admin as cli_admin
from fleet_server.cli import labels as cli_labels
from fleet_server.cli import rollouts as cli_rollouts
from fleet_server.cli.main import cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2027, 1, 4, 11, 0, tzinfo=UTC)  # Monday 12:00 in Berlin


class Env:
    def __init__(self, api: TestClient, registry: Registry, runner: RolloutRunner) -> None:
        self.api, self.registry, self.runner = api, registry, runner

    def report(self, device: str, labels: dict[str, Any]) -> None:
        state = ReportedState(device, 0.0, "0.1", 1, {"digits": ModelReport(1, assigned=1)})
        self.registry.record_reported(device, {**state.to_dict(), "labels": labels})


@pytest.fixture
def env(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[Env]:
    keys = digits_bundles.keys
    clock = FakeClock(wall=T0)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock.wall)
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=clock.wall,
        ttl=timedelta(hours=1),
    )
    runner = RolloutRunner(registry, service, clock.wall)
    app = create_app(
        service,
        TOKEN,
        max_request_bytes=4096,
        max_upload_bytes=4 * 1024 * 1024,
        extra_routes=(
            lambda guard: label_routes(registry, guard, clock.wall),
            lambda guard: rollout_routes(runner, guard),
        ),
    )
    with TestClient(app) as client:
        e = Env(client, registry, runner)
        for i in range(6):
            registry.enroll(f"cam-{i}", group="line")
            e.report(f"cam-{i}", {"site": "a" if i < 3 else "b", "hw": "pi5"})
        yield e
    runner.close()
    registry.close()


def test_labels_are_set_shown_and_select_devices(env: Env) -> None:
    api = env.api
    res = api.post(
        "/v1/devices/cam-0/labels", json={"set": {"site": "b", "line": "3"}}, headers=AUTH
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["operator"] == {"line": "3", "site": "b"}
    assert body["device"] == {"hw": "pi5", "site": "a"}
    assert body["effective"]["site"] == "b"
    ids = lambda q: [d["id"] for d in api.get(f"/v1/devices?{q}", headers=AUTH).json()["devices"]]  # noqa: E731
    assert ids("selector=site%3Db") == ["cam-0", "cam-3", "cam-4", "cam-5"]
    assert ids("selector=site%3Db,line") == ["cam-0"]
    assert ids("selector=site%20notin%20(b)") == ["cam-1", "cam-2"]
    assert ids("selector=site%3Db&group=other") == []
    res = api.post("/v1/devices/cam-0/labels", json={"remove": ["site"]}, headers=AUTH)
    assert res.json()["effective"]["site"] == "a"
    assert api.get("/v1/devices/cam-0/labels", headers=AUTH).json()["operator"] == {"line": "3"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/devices/cam-0/labels", {"set": {"bad key": "x"}}, 400, "label_invalid"),
        ("POST", "/v1/devices/cam-0/labels", {"set": {"site": "\x1b[31m"}}, 400, "label_invalid"),
        ("POST", "/v1/devices/cam-0/labels", {"set": ["site=a"]}, 400, "label_invalid"),
        ("POST", "/v1/devices/cam-0/labels", {"remove": "site"}, 400, "label_invalid"),
        ("POST", "/v1/devices/cam-0/labels", {"remove": ["k"] * 65}, 400, "label_invalid"),
        ("POST", "/v1/devices/cam-0/labels", {"add": {}}, 400, "bad_request"),
        ("POST", "/v1/devices/nope/labels", {"set": {"a": "b"}}, 404, "device_unknown"),
        ("GET", "/v1/devices/nope/labels", None, 404, "device_unknown"),
        ("GET", "/v1/devices?selector=site%3D", None, 400, "selector_invalid"),
        ("GET", "/v1/devices?selector=" + "a" * 3000, None, 400, "bad_request"),
        ("GET", "/v1/devices?selector=a%0Ab", None, 400, "bad_request"),
        ("GET", "/v1/devices?label_group=nope", None, 404, "label_group_unknown"),
        ("PUT", "/v1/label-groups/g", {"selector": "a in ("}, 400, "selector_invalid"),
        ("PUT", "/v1/label-groups/g", {"selector": "a", "x": 1}, 400, "label_invalid"),
        ("PUT", "/v1/label-groups/Bad%20Name", {"selector": "a"}, 400, "label_invalid"),
        ("GET", "/v1/label-groups/nope", None, 404, "label_group_unknown"),
        ("DELETE", "/v1/label-groups/nope", None, 404, "label_group_unknown"),
        (
            "PUT",
            "/v1/windows/w",
            {"selector": "a", "start": "25:00", "duration_minutes": 5, "timezone": "UTC"},
            400,
            "window_invalid",
        ),
        (
            "PUT",
            "/v1/windows/w",
            {
                "selector": "a",
                "start": "01:00",
                "duration_minutes": 5,
                "timezone": "../../etc/passwd",
            },
            400,
            "window_invalid",
        ),
        ("PUT", "/v1/windows/w", {"selector": "a"}, 400, "window_invalid"),
        ("DELETE", "/v1/windows/nope", None, 404, "window_unknown"),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "labels": "site="},
            400,
            "selector_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "labels": ["site=a"]},
            400,
            "selector_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "label_group": "g", "labels": "a"},
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "label_group": 3},
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "label_group": "nope"},
            404,
            "label_group_unknown",
        ),
        (
            "POST",
            "/v1/rollouts",
            {"model": "digits", "version": 2, "labels": "a", "group": "g"},
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {
                "model": "digits",
                "version": 2,
                "labels": "a",
                "policy": {"disruption_budget": {"label": "site"}},
            },
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {
                "model": "digits",
                "version": 2,
                "labels": "a",
                "policy": {"disruption_budget": {"label": "bad key", "max_devices": 1}},
            },
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {
                "model": "digits",
                "version": 2,
                "labels": "a",
                "policy": {"disruption_budget": {"label": "s", "max_fraction": 1.5}},
            },
            400,
            "rollout_policy_invalid",
        ),
        (
            "POST",
            "/v1/rollouts",
            {
                "model": "digits",
                "version": 2,
                "labels": "a",
                "policy": {"disruption_budget": {"label": "s", "max_devices": 0, "extra": 1}},
            },
            400,
            "rollout_policy_invalid",
        ),
    ],
)
def test_hostile_requests_are_refused_with_their_code(
    env: Env, method: str, path: str, body: Any, status: int, code: str
) -> None:
    res = env.api.request(method, path, json=body, headers=AUTH)
    assert (res.status_code, res.json()["code"]) == (status, code), res.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/devices/cam-0/labels"),
        ("POST", "/v1/devices/cam-0/labels"),
        ("GET", "/v1/label-groups"),
        ("PUT", "/v1/label-groups/g"),
        ("DELETE", "/v1/windows/w"),
        ("GET", "/v1/windows"),
    ],
)
def test_every_label_route_needs_the_token(env: Env, method: str, path: str) -> None:
    assert env.api.request(method, path, json={}).status_code == 401


def test_groups_and_windows_through_the_api(env: Env) -> None:
    api = env.api
    assert (
        api.put("/v1/label-groups/site-b", json={"selector": "site=b"}, headers=AUTH).status_code
        == 200
    )
    shown = api.get("/v1/label-groups/site-b", headers=AUTH).json()
    assert shown["devices"] == ["cam-3", "cam-4", "cam-5"]
    env.report("cam-0", {"site": "b"})  # re-evaluated as labels change
    assert api.get("/v1/label-groups", headers=AUTH).json()["groups"][0]["members"] == 4
    ids = [
        d["id"] for d in api.get("/v1/devices?label_group=site-b", headers=AUTH).json()["devices"]
    ]
    assert ids == ["cam-0", "cam-3", "cam-4", "cam-5"]
    body = {"selector": "site=b", "weekdays": ["mon", "tue"], "start": "02:00",
            "duration_minutes": 60, "timezone": "Europe/Berlin"}  # fmt: skip
    assert api.put("/v1/windows/night", json=body, headers=AUTH).status_code == 200
    [w] = api.get("/v1/windows", headers=AUTH).json()["windows"]
    assert w["open_now"] is False
    assert w["next_open"] == "2027-01-05T01:00:00+00:00"
    assert api.delete("/v1/windows/night", headers=AUTH).json() == {"deleted": "night"}
    assert api.delete("/v1/label-groups/site-b", headers=AUTH).json() == {"deleted": "site-b"}


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def run(env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    transport = env.api._transport

    def client(url: str, token: str) -> admin_client.AdminClient:
        return admin_client.AdminClient(url, token, transport=transport)

    for module in (cli_admin, cli_labels, cli_rollouts):
        monkeypatch.setattr(module, "AdminClient", client)

    def invoke(*args: str, code: int = 0, error: str | None = None) -> str:
        res = CliRunner().invoke(cli, [*args, "--url", "http://testserver", "--token", TOKEN])
        if error is not None:  # the server's refusal, for the CLI's error boundary
            assert getattr(res.exception, "server_code", None) == error, repr(res.exception)
            return str(res.exception)
        assert res.exit_code == code, res.output + repr(res.exception)
        return res.output

    return invoke


def test_cli_labels_groups_windows_and_a_held_rollout(
    env: Env, run: Any, digits_bundles: DigitsBundles
) -> None:
    out = run("devices", "label", "cam-3", "line=7", "site=b")
    assert "operator   line=7, site=b" in out
    out = run("devices", "label", "cam-3", "--remove", "line")
    assert "line=7" not in out
    assert "device     hw=pi5, site=b" in run("devices", "labels", "cam-3")
    shown = run("devices", "show", "cam-3")
    assert re.search(r"^labels +hw=pi5, site=b$", shown, re.M), shown  # the operator's site wins
    assert re.search(r"^labels operator +site=b$", shown, re.M), shown
    assert re.search(r"^labels device +hw=pi5, site=b$", shown, re.M), shown
    detail = json.loads(run("devices", "show", "cam-3", "--json"))
    assert detail["labels"]["effective"] == {"hw": "pi5", "site": "b"}
    assert "bad key" in run("devices", "label", "cam-3", "bad key=x", error="label_invalid")
    run("devices", "label", "cam-3", code=2)  # nothing to do: a usage error
    listing = json.loads(run("devices", "list", "--selector", "site=b", "--json"))
    assert [d["id"] for d in listing] == ["cam-3", "cam-4", "cam-5"]
    assert "at character 5" in run(
        "devices", "list", "--selector", "site=", error="selector_invalid"
    )
    assert "label group site-b: site=b" in run("label-groups", "define", "site-b", "site=b")
    assert "site-b" in run("label-groups", "list")
    assert "cam-4" in run("label-groups", "show", "site-b")
    out = run("windows", "set", "night", "--selector", "site=b", "--days", "mon,tue",
              "--start", "02:00", "--duration", "60", "--timezone", "Europe/Berlin")  # fmt: skip
    assert "mon,tue 02:00 for 60 min (Europe/Berlin)" in out
    assert "2027-01-05T01:00" in run("windows", "list")
    # A rollout of the whole line by label group, with a budget; site b waits for its window.
    for v in (1, 2):
        env.registry.publish_bundle("digits", v, channel="s", sha256=f"{v}" * 64, length=1,
                                    targets_sha256=f"{v + 2}" * 64)  # fmt: skip
    run("label-groups", "define", "line", "hw=pi5")
    r = json.loads(run("rollouts", "create", "digits", "2", "--label-group", "line",
                       "--canary", "1", "--budget-label", "site", "--budget-max", "2",
                       "--no-shadow", "--no-offline-check", "--json"))  # fmt: skip
    assert r["selector"]["labels"] == "hw=pi5"
    assert r["policy"]["disruption_budget"]["max_devices"] == 2
    env.runner.step()
    view = run("rollouts", "status", r["id"])
    assert "budget at most 2 per site" in view
    assert "waits for its window, opens 2027-01-05T01:00:00+00:00" in view
    assert "waits for the disruption budget" in view  # site a: 3 devices, 2 at once
    status = json.loads(run("rollouts", "status", r["id"], "--json"))
    assert status["counts"]["waiting_window"] == 3
    assert status["counts"]["waiting_budget"] == 1
    run("rollouts", "create", "digits", "2", "--selector", "site=b", "--group", "line", code=2)
    run("windows", "delete", "night")
    run("label-groups", "delete", "site-b")
    assert "site-b" not in run("label-groups", "list")
