"""Console writes: the session's CSRF token, the role of the matching admin API route, and
nothing done (nor recorded) when either fails; viewers see no write buttons and are refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from console_world import PASSWORD, ROLES, TOKEN, ConsoleWorld, login
from starlette.testclient import TestClient

from bundles import DigitsBundles
from fleet_server.accounts.roles import Principal, Role
from fleet_server.admin.auth import Authenticator
from fleet_server.errors import ForbiddenError
from fleet_server.registry import labels as label_store
from fleet_server.registry.audit import AuditQuery, audit_entries
from fleet_server.rollouts.policy import RolloutPolicy, Selector

CREATE = {"model": "digits", "version": "2", "target": "group", "selector": "line-3"}


@pytest.fixture
def world(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path, keys=digits_bundles.keys)
    for i in range(4):
        w.registry.enroll(f"dev-{i}", group="line-3")
        w.install(f"dev-{i}", 1, 1)
    for v in (1, 2):  # real signed bundles: an assignment signs their targets
        w.service.publish_model_bytes(digits_bundles.path(v).read_bytes())
    yield w
    w.close()


@pytest.fixture
def app_client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def _rollout(world: ConsoleWorld) -> str:
    r = world.runner.create("digits", 2, selector=Selector(group="line-3"),
                            policy=RolloutPolicy(canary_count=1, min_devices=1))  # fmt: skip
    return r.id


def _entries(world: ConsoleWorld) -> int:
    return len(audit_entries(world.registry, AuditQuery(limit=1000)))


@pytest.mark.parametrize(
    "csrf",
    [None, "", "0" * 64, "x" * 300, "other-session"],
    ids=["absent", "empty", "wrong", "long", "other-session"],
)
def test_a_write_without_the_sessions_csrf_token_is_refused_and_not_done(
    app_client: TestClient, world: ConsoleWorld, csrf: str | None
) -> None:
    rollout_id = _rollout(world)
    if csrf == "other-session":
        with TestClient(world.app()) as other:
            csrf = login(other, "ada")
    login(app_client, "ada")
    before = _entries(world)
    data = {} if csrf is None else {"csrf_token": csrf}
    r = app_client.post(f"/console/rollouts/{rollout_id}/abort", data=data)
    assert r.status_code == 403
    assert "CSRF" in r.text
    assert world.runner.get(rollout_id).state == "pending"
    assert _entries(world) == before  # refused before the attempt, as the API refuses
    r = app_client.post("/console/rollouts", data={**CREATE, **data})
    assert r.status_code == 403
    assert [x.id for x in world.runner.rollouts()] == [rollout_id]


def test_the_csrf_header_htmx_sends_is_accepted(
    app_client: TestClient, world: ConsoleWorld
) -> None:
    rollout_id = _rollout(world)
    csrf = login(app_client, "ada")
    r = app_client.post(f"/console/rollouts/{rollout_id}/pause",
                        headers={"X-CSRF-Token": csrf, "HX-Request": "true"})  # fmt: skip
    assert r.status_code == 200
    assert world.runner.get(rollout_id).state == "paused"


def test_a_write_without_a_session_goes_to_the_login_page(
    app_client: TestClient, world: ConsoleWorld
) -> None:
    rollout_id = _rollout(world)
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        r = app_client.post(f"/console/rollouts/{rollout_id}/abort", headers=headers,
                            data={"csrf_token": "x"}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 303
        assert r.headers["location"].startswith("/console/login")
    assert world.runner.get(rollout_id).state == "pending"


WRITES = [
    ("POST /v1/rollouts", "/console/rollouts", CREATE),
    ("POST /v1/rollouts/{rollout_id}/approve", "/console/rollouts/{id}/approve", {}),
    ("POST /v1/rollouts/{rollout_id}/pause", "/console/rollouts/{id}/pause", {}),
    ("POST /v1/rollouts/{rollout_id}/abort", "/console/rollouts/{id}/abort", {}),
    ("POST /v1/devices/{device_id}/revoke", "/console/devices/dev-1/revoke", {}),
    (
        "POST /v1/devices/{device_id}/labels",
        "/console/devices/dev-1/labels",
        {"key": "site", "value": "x"},
    ),
    ("POST /v1/devices/{device_id}/commands", "/console/devices/dev-1/commands", {"name": "ping"}),
    (
        "POST /v1/assign",
        "/console/assign",
        {"model": "digits", "version": "2", "kind": "device", "target": "dev-1"},
    ),
    ("POST /v1/accounts", "/console/accounts", {"name": "zed", "role": "viewer"}),
    ("POST /v1/accounts/{name}/disable", "/console/accounts/viv/disable", {}),
    ("POST /v1/accounts/{name}/enable", "/console/accounts/viv/enable", {}),
    ("POST /v1/accounts/{name}/role", "/console/accounts/viv/role", {"role": "operator"}),
    (
        "POST /v1/accounts/{name}/password",
        "/console/me/password",
        {"current_password": PASSWORD, "password": "x" * 20, "confirm": "x" * 20},
    ),
    ("POST /v1/tokens", "/console/me/tokens", {"label": "ci"}),
]


@pytest.mark.parametrize("account", sorted(ROLES))
@pytest.mark.parametrize(("action", "url", "form"), WRITES, ids=[w[0] for w in WRITES])
def test_each_write_is_allowed_exactly_when_the_api_route_is(
    world: ConsoleWorld, account: str, action: str, url: str, form: dict[str, str]
) -> None:
    role = ROLES[account]
    try:
        Authenticator.authorize(_principal(account, role), action)
        allowed = True
    except ForbiddenError:
        allowed = False
    rollout_id = _rollout(world)
    with TestClient(world.app()) as c:
        csrf = login(c, account)
        r = c.post(url.format(id=rollout_id), data={**form, "csrf_token": csrf},
                   follow_redirects=False)  # fmt: skip
    if allowed:
        assert r.status_code in (201, 303), r.text  # 201: the new token's page
    else:
        assert r.status_code == 403, r.text
        assert "may not" in r.text
        [outcome, attempt] = audit_entries(  # the login's own entries aside
            world.registry, AuditQuery(actor=f"session:{account}", action=action, limit=10)
        )
        assert (attempt.action, attempt.phase) == (action, "attempt")
        assert (outcome.status, outcome.code) == (403, "forbidden")
        assert world.runner.get(rollout_id).state == "pending"
        assert len(world.runner.rollouts()) == 1
        assert not world.registry.get_device("dev-1").revoked
        viv = world.accounts.show("viv")
        assert (viv.role, viv.disabled) == (Role.VIEWER, False)
        assert "zed" not in [a.name for a in world.accounts.list()]
        assert label_store.device_labels(world.registry, "dev-1").operator == {}
        assert world.published.sent == []
        assert world.gateway.published == []


def _principal(account: str, role: Role) -> Principal:
    return Principal(account, role, "session", "0" * 16)


def test_a_viewer_sees_no_write_button_and_the_api_refuses_its_token_too(
    app_client: TestClient, world: ConsoleWorld
) -> None:
    rollout_id = _rollout(world)
    login(app_client, "viv")
    pages = [
        app_client.get("/console/rollouts").text,
        app_client.get(f"/console/rollouts/{rollout_id}").text,
        app_client.get("/console/devices/dev-1").text,
    ]
    for text in pages:
        assert 'method="post" action="/console/rollouts' not in text
        assert "/revoke" not in text
        assert 'id="cmd-' not in text
    login(app_client, "ada")
    admin_view = app_client.get(f"/console/rollouts/{rollout_id}").text
    assert 'id="cmd-abort"' in admin_view  # the buttons exist for a role that may
    _, secret = world.accounts.create_token(
        "viv", Role.VIEWER, world.clock.wall() + timedelta(days=1)
    )
    with TestClient(world.app()) as api:
        r = api.post(f"/v1/rollouts/{rollout_id}/abort",
                     headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
        assert r.status_code == 403
        assert r.json()["code"] == "forbidden"
    assert world.runner.get(rollout_id).state == "pending"


def test_login_failures_lock_the_account_out(app_client: TestClient) -> None:
    for _ in range(5):
        app_client.post("/console/login", data={"name": "ops", "password": "wrong password!"})
    r = app_client.post("/console/login", data={"name": "ops", "password": PASSWORD})
    assert r.status_code == 429
    assert "edgefleet_session" not in r.headers.get("set-cookie", "")
