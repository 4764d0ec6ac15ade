"""Console account pages: an accounts admin lists, creates, disables, enables and re-roles
accounts; any account changes its own password and manages its own API tokens (the secret is
shown once). Each write is audited as the admin API request it stands for, with no password
nor token secret in the audit log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from console_world import PASSWORD, ConsoleWorld, login
from starlette.testclient import TestClient

from fleet_server.accounts.roles import Role
from fleet_server.registry.audit import AuditQuery, audit_entries

NEW_PASSWORD = "a much longer passphrase 2026"
_SECRET = re.compile(r'<code id="token-secret">([^<]+)</code>')


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def _audit_text(world: ConsoleWorld) -> str:
    rows = audit_entries(world.registry, AuditQuery(limit=1000))
    return json.dumps([r.to_dict() for r in rows])


def _last(world: ConsoleWorld, action: str) -> list[tuple[str, int | None]]:
    rows = audit_entries(world.registry, AuditQuery(action=action, limit=10))
    return [(r.phase, r.status) for r in rows]


def test_an_admin_lists_creates_disables_enables_and_reroles_accounts(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "ada")
    page = client.get("/console/accounts")
    assert page.status_code == 200
    for name in ("ada", "rel", "ops", "viv"):
        assert f'id="account-{name}"' in page.text
    assert 'href="/console/accounts"' in page.text  # in the admin's navigation
    r = client.post("/console/accounts", data={"name": "vera", "role": "viewer",
                    "password": PASSWORD, "csrf_token": csrf}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    assert world.accounts.show("vera").role == Role.VIEWER
    assert world.accounts.authenticate("vera", PASSWORD).account == "vera"
    assert _last(world, "POST /v1/accounts")[0] == ("outcome", 201)
    r = client.post("/console/accounts/vera/role", data={"role": "operator", "csrf_token": csrf},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert world.accounts.show("vera").role == Role.OPERATOR
    client.post("/console/accounts/vera/disable", data={"csrf_token": csrf})
    assert world.accounts.show("vera").disabled
    assert "Enable" in client.get("/console/accounts").text
    client.post("/console/accounts/vera/enable", data={"csrf_token": csrf})
    assert not world.accounts.show("vera").disabled
    assert PASSWORD not in _audit_text(world)  # the created password is redacted
    [_outcome, attempt] = audit_entries(
        world.registry, AuditQuery(action="POST /v1/accounts/{name}/role", limit=10)
    )
    assert attempt.object == "account:vera"
    assert attempt.actor == "session:ada"


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"name": "Bad Name", "role": "viewer"}, "account name"),
        ({"name": "x" * 65, "role": "viewer"}, "longer than 64"),
        ({"name": "zed", "role": "root"}, "unknown role"),
        ({"name": "ada", "role": "viewer"}, "exists"),
        ({"name": "zed", "role": "viewer", "password": "short"}, "password"),
    ],
    ids=["bad-name", "long-name", "bad-role", "exists", "weak-password"],
)
def test_a_bad_create_form_is_refused_and_recorded(
    client: TestClient, world: ConsoleWorld, form: dict[str, str], message: str
) -> None:
    csrf = login(client, "ada")
    before = len(world.accounts.list())
    r = client.post("/console/accounts", data={**form, "csrf_token": csrf})
    assert r.status_code in (400, 409, 422), r.text
    assert message in r.text
    assert len(world.accounts.list()) == before
    assert _last(world, "POST /v1/accounts")[0][0] == "outcome"


def test_the_last_admin_cannot_disable_or_demote_itself(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "ada")
    for url, data in (("/console/accounts/ada/disable", {}),
                      ("/console/accounts/ada/role", {"role": "viewer"})):  # fmt: skip
        r = client.post(url, data={**data, "csrf_token": csrf})
        assert r.status_code == 409, r.text
    acc = world.accounts.show("ada")
    assert (acc.role, acc.disabled) == (Role.ADMIN, False)


@pytest.mark.parametrize("account", ["rel", "ops", "viv"])
def test_only_an_accounts_admin_sees_the_accounts_page(client: TestClient, account: str) -> None:
    login(client, account)
    assert client.get("/console/accounts").status_code == 403
    me = client.get("/console/me")
    assert me.status_code == 200
    assert 'href="/console/accounts"' not in me.text
    assert f"My account: {account}" in me.text


def test_my_password_change_needs_the_current_one_and_ends_the_session(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "viv")
    form = {"current_password": "not it at all", "password": NEW_PASSWORD,
            "confirm": NEW_PASSWORD, "csrf_token": csrf}  # fmt: skip
    r = client.post("/console/me/password", data=form)
    assert r.status_code == 403
    assert "current password is wrong" in r.text
    r = client.post("/console/me/password", data={**form, "current_password": PASSWORD,
                                                  "confirm": "different"})  # fmt: skip
    assert r.status_code == 400
    r = client.post("/console/me/password", data={**form, "current_password": PASSWORD},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login"
    assert world.accounts.authenticate("viv", NEW_PASSWORD).account == "viv"
    page = client.get("/console/me", follow_redirects=False)  # the session ended
    assert page.status_code == 303
    text = _audit_text(world)
    assert NEW_PASSWORD not in text
    assert PASSWORD not in text
    [outcome, _, refused, _, wrong, _] = audit_entries(
        world.registry, AuditQuery(action="POST /v1/accounts/{name}/password", limit=10)
    )
    assert (outcome.status, refused.status, wrong.status) == (200, 400, 403)
    assert outcome.object == "account:viv"


def test_my_tokens_created_shown_once_listed_and_revoked(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "ops")
    r = client.post("/console/me/tokens", data={"label": "ci", "role": "viewer",
                    "expires_days": "7", "csrf_token": csrf})  # fmt: skip
    assert r.status_code == 201, r.text
    found = _SECRET.search(r.text)
    assert found is not None
    secret = found.group(1)
    who = world.accounts.resolve_token(secret)
    assert who is not None
    assert (who.account, who.role) == ("ops", Role.VIEWER)
    page = client.get("/console/me").text
    assert secret not in page  # shown once
    assert "ci" in page
    assert secret not in _audit_text(world)
    [token] = world.accounts.list_tokens("ops")
    r = client.post(f"/console/me/tokens/{token.id}/revoke", data={"csrf_token": csrf},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert world.accounts.resolve_token(secret) is None
    assert _last(world, "POST /v1/tokens/{token_id}/revoke")[0] == ("outcome", 200)


@pytest.mark.parametrize(
    ("form", "status"),
    [
        ({"role": "admin"}, 403),
        ({"expires_days": "0"}, 400),
        ({"expires_days": "100000"}, 400),
        ({"expires_days": "-1"}, 400),
        ({"label": "x" * 201}, 400),
        ({"role": "root"}, 400),
    ],
    ids=["above-own-role", "zero-days", "too-many-days", "negative", "long-label", "bad-role"],
)
def test_a_bad_token_form_creates_nothing(
    client: TestClient, world: ConsoleWorld, form: dict[str, str], status: int
) -> None:
    csrf = login(client, "ops")
    r = client.post("/console/me/tokens", data={**form, "csrf_token": csrf})
    assert r.status_code == status, r.text
    assert world.accounts.list_tokens("ops") == []


def test_another_accounts_token_is_not_revoked_from_my_page(
    client: TestClient, world: ConsoleWorld
) -> None:
    token_id, secret = world.accounts.create_token(
        "viv", Role.VIEWER, world.clock.wall() + timedelta(days=1)
    )
    csrf = login(client, "ada")  # even an admin: this page is the caller's own tokens
    r = client.post(f"/console/me/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    assert r.status_code == 403
    assert world.accounts.resolve_token(secret) is not None
