"""Every admin API route by every role, on the full app the server builds: an allowed call is
never 403, a refused one is 403 ``forbidden``, changes nothing, and is recorded (writes: in the
audit log with outcome 403; reads: the refusal counter in /metrics). Also: the route table
covers every route, the session cookie's CSRF check, the bootstrap token, and the account
routes' own-or-admin rule."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from argon2 import PasswordHasher
from starlette.routing import Route
from starlette.testclient import TestClient

from bundles import DigitsBundles
from clock import FakeClock
from fakes import FakeGateway
from fleet_server.accounts.passwords import Passwords
from fleet_server.accounts.roles import ROUTE_PERMISSIONS, Role, allows
from fleet_server.accounts.sessions import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE
from fleet_server.accounts.store import Accounts
from fleet_server.admin.api import create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.audit import AuditQuery, audit_entries
from fleet_server.registry.ops.agent_releases import list_agent_releases
from fleet_server.registry.store import Registry
from fleet_server.server import AdminParts, admin_routes
from fleet_server.service import FleetService

BOOTSTRAP = "b" * 32
PW = "correct horse battery"
ROLES = list(Role)


@dataclass
class Env:
    client: TestClient
    registry: Registry
    accounts: Accounts
    clock: FakeClock
    tokens: dict[Role, str]  # role -> bearer of the account "<role>-user"
    spare: dict[Role, str]  # role -> a token id of that account, to revoke


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def env(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[Env]:
    clock = FakeClock()
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock.wall)
    registry.upgrade()
    keys = digits_bundles.keys
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=clock.wall,
        ttl=timedelta(hours=1),
    )
    accounts = Accounts(
        registry,
        clock.wall,
        passwords=Passwords(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)),
    )
    absent = cast(Any, None)  # parts the role check does not need: their handlers fail (500)
    app = create_app(
        service,
        BOOTSTRAP,
        max_request_bytes=4096,
        max_upload_bytes=4 * 1024 * 1024,
        # Every route provider the server mounts (fleet_server.server.admin_routes).
        extra_routes=admin_routes(
            AdminParts(
                service,
                registry,
                absent,
                absent,
                absent,
                accounts,
                absent,
                absent,
                4 * 1024 * 1024,
                clock.wall,
            )
        ),
        auditor=Auditor(registry, clock.wall, max_body_bytes=1024 * 1024),
        authenticator=Authenticator(accounts, BOOTSTRAP),
    )
    tokens, spare = {}, {}
    later = clock.utc + timedelta(days=30)
    for role in ROLES:
        accounts.create(f"{role}-user", role, PW)
        tokens[role] = accounts.create_token(f"{role}-user", role, later)[1]
        spare[role] = accounts.create_token(f"{role}-user", role, later)[0]
    accounts.create("target", Role.VIEWER, PW)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(client, registry, accounts, clock, tokens, spare)
    registry.close()


def _routes(client: TestClient) -> list[tuple[str, str]]:
    out = []
    for route in cast(Any, client.app).routes:
        assert isinstance(route, Route)
        if route.path == "/healthz":
            continue
        out.extend((m, route.path) for m in sorted(set(route.methods or ()) - {"HEAD"}))
    return out


def _concrete(path: str, role: Role, env: Env) -> str:
    def value(m: re.Match[str]) -> str:
        param = m.group(1)
        if param == "name" and path.startswith("/v1/accounts/"):
            # The caller's own account on "self" routes, another one on admin routes.
            return f"{role}-user" if path.endswith("/password") else "target"
        if param == "token_id":
            return env.spare[role]
        return {"version": "1", "sha256": "a" * 64}.get(param, "x-1")

    return re.sub(r"\{([^}]+)\}", value, path)


def _state(env: Env) -> Any:
    """Everything a refused call could have changed."""
    reg = env.registry
    return (
        [(d.id, d.revoked_at) for d in reg.list_devices()],
        [(b.name, b.version) for b in reg.list_bundles()],
        [a.release for a in list_agent_releases(reg)],
        [a.to_dict() for a in env.accounts.list()],
        [t.to_dict() for t in env.accounts.list_tokens()],
    )


def _refused_reads(env: Env) -> float:
    text = env.client.get("/metrics", headers=_bearer(BOOTSTRAP)).text
    found = re.search(r"^edgefleet_admin_refused_forbidden ([0-9.e+]+)$", text, re.MULTILINE)
    assert found is not None
    return float(found.group(1))


def test_every_route_is_in_the_permission_table(env: Env) -> None:
    actions = {f"{m} {p}" for m, p in _routes(env.client)}
    assert len(actions) >= 40
    assert actions == set(ROUTE_PERMISSIONS)  # none missing, none stale


@pytest.mark.parametrize("role", ROLES)
def test_role_by_route(env: Env, role: Role) -> None:
    checked = {"allowed": 0, "refused": 0}
    for method, path in _routes(env.client):
        action = f"{method} {path}"
        url = _concrete(path, role, env)
        body = {"current_password": PW, "password": PW}  # self routes: the right one
        before = _state(env)
        reads = _refused_reads(env) if method == "GET" else 0.0
        r = env.client.request(method, url, headers=_bearer(env.tokens[role]), json=body)
        if allows(role, ROUTE_PERMISSIONS[action]):
            checked["allowed"] += 1
            assert r.status_code != 403, f"{role} refused {action}: {r.text}"
            continue
        checked["refused"] += 1
        assert (r.status_code, r.json()["code"]) == (403, "forbidden"), action
        assert _state(env) == before, f"{role} changed something through {action}"
        if method == "GET":
            assert _refused_reads(env) == reads + 1, action
        else:
            outcomes = [
                (e.actor, e.status, e.code)
                for e in audit_entries(env.registry, AuditQuery(action=action, limit=50))
                if e.phase == "outcome"
            ]
            assert (f"token:{role}-user", 403, "forbidden") in outcomes, action
    assert checked["allowed"] > 0
    assert (checked["refused"] > 0) == (role != Role.ADMIN)


def test_viewer_cannot_write_anything_and_admin_can_reach_everything(env: Env) -> None:
    writes = [a for a in ROUTE_PERMISSIONS if not a.startswith("GET ")]
    open_to_viewer = sorted(a for a in writes if allows(Role.VIEWER, ROUTE_PERMISSIONS[a]))
    # Only its own password and tokens.
    assert open_to_viewer == [
        "POST /v1/accounts/{name}/password",
        "POST /v1/tokens",
        "POST /v1/tokens/{token_id}/revoke",
    ]
    assert all(allows(Role.ADMIN, p) for p in ROUTE_PERMISSIONS.values())


# Authentication.
def test_unknown_expired_and_revoked_tokens_are_401(env: Env) -> None:
    c = env.client
    assert c.get("/v1/status").status_code == 401
    assert c.get("/v1/status", headers=_bearer("eft_nope")).status_code == 401
    assert c.get("/v1/status", headers={"Authorization": BOOTSTRAP}).status_code == 401
    token = env.tokens[Role.VIEWER]
    assert c.get("/v1/status", headers=_bearer(token)).status_code == 200
    env.accounts.revoke_token(token.split("_")[1])
    assert c.get("/v1/status", headers=_bearer(token)).status_code == 401
    op = env.tokens[Role.OPERATOR]
    env.clock.advance(30 * 86400)
    assert c.get("/v1/status", headers=_bearer(op)).status_code == 401


def test_bootstrap_token_is_the_admin_and_can_be_disabled(env: Env) -> None:
    who = env.client.get("/v1/whoami", headers=_bearer(BOOTSTRAP)).json()
    assert (who["account"], who["role"], who["via"]) == ("admin", "admin", "bootstrap-token")
    r = env.client.post(
        "/v1/accounts",
        headers=_bearer(BOOTSTRAP),
        json={"name": "alice", "role": "operator", "password": PW},
    )
    assert r.status_code == 201
    attempt = audit_entries(env.registry, AuditQuery(action="POST /v1/accounts"))[-1]
    assert attempt.actor == "bootstrap-token:admin"
    assert attempt.object == "account:alice"
    assert PW not in str(attempt.change)
    off = Authenticator(env.accounts, None)
    assert off.bearer(f"Bearer {BOOTSTRAP}") is None
    assert off.bearer(f"Bearer {env.tokens[Role.ADMIN]}") is not None


def test_session_cookie_writes_need_the_csrf_token(env: Env) -> None:
    who = env.accounts.authenticate("operator-user", PW)
    session = env.accounts.create_session(who, "testclient")
    c = env.client
    c.cookies.set(SESSION_COOKIE, session.cookie)
    try:
        me = c.get("/v1/whoami").json()  # a read needs no CSRF token
        assert (me["account"], me["via"], me["credential"]) == (
            "operator-user",
            "session",
            session.id,
        )
        body = {"id": "cam-9"}
        token = session.csrf_token
        wrong = token[:-1] + ("1" if token.endswith("0") else "0")  # never the token itself
        for headers in ({}, {CSRF_HEADER: ""}, {CSRF_HEADER: wrong}):
            r = c.post("/v1/devices", json=body, headers=headers)
            assert (r.status_code, r.json()["code"]) == (403, "csrf_failed")
        assert env.registry.list_devices() == []
        form = {CSRF_FIELD: "wrong"}
        r = c.post("/v1/devices/cam-9/revoke", data=form)
        assert (r.status_code, r.json()["code"]) == (403, "csrf_failed")
        ok = c.post("/v1/devices", json=body, headers={CSRF_HEADER: session.csrf_token})
        assert ok.status_code == 201
        entry = audit_entries(env.registry, AuditQuery(action="POST /v1/devices"))[0]
        assert entry.actor == "session:operator-user"
        # A valid CSRF token does not lift the role check.
        r = c.post("/v1/root", json={}, headers={CSRF_HEADER: session.csrf_token})
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        # A bearer header wins over the cookie (no silent fallback to it).
        assert c.get("/v1/whoami", headers=_bearer("eft_bad")).status_code == 401
        env.accounts.end_session(session.id)
        assert c.get("/v1/whoami").status_code == 401
    finally:
        c.cookies.clear()
    metrics = c.get("/metrics", headers=_bearer(BOOTSTRAP)).text
    assert re.search(r"^edgefleet_admin_refused_csrf 4\.0$", metrics, re.MULTILINE)


# The account routes' own-or-admin rule.
def test_tokens_are_own_unless_admin_and_never_above_the_caller(env: Env) -> None:
    c = env.client
    viewer, admin = _bearer(env.tokens[Role.VIEWER]), _bearer(env.tokens[Role.ADMIN])
    r = c.post("/v1/tokens", headers=viewer, json={"label": "ci", "expires_days": 7})
    assert r.status_code == 201
    created = r.json()
    assert (created["account"], created["role"]) == ("viewer-user", "viewer")
    assert c.get("/v1/whoami", headers=_bearer(created["token"])).json()["role"] == "viewer"
    outcome = next(
        e
        for e in audit_entries(env.registry, AuditQuery(action="POST /v1/tokens"))
        if e.phase == "outcome"
    )
    assert created["token"] not in str(outcome.change)
    assert created["token"].split("_", 2)[2] not in str(outcome.to_dict())
    for body in ({"role": "admin"}, {"account": "target"}):
        r = c.post("/v1/tokens", headers=viewer, json=body)
        assert (r.status_code, r.json()["code"]) == (403, "forbidden"), body
    assert c.get("/v1/tokens?account=target", headers=viewer).status_code == 403
    own = c.get("/v1/tokens", headers=viewer).json()["tokens"]
    assert {t["account"] for t in own} == {"viewer-user"}
    assert all("token" not in t and "secret" not in str(t) for t in own)
    other = env.spare[Role.OPERATOR]
    assert c.post(f"/v1/tokens/{other}/revoke", headers=viewer).status_code == 403
    assert c.post(f"/v1/tokens/{other}/revoke", headers=admin).status_code == 200
    r = c.post("/v1/tokens", headers=admin, json={"account": "target", "role": "viewer"})
    assert r.status_code == 201
    r = c.post("/v1/tokens", headers=admin, json={"account": "target", "role": "operator"})
    assert (r.status_code, r.json()["code"]) == (400, "account_error")  # above the account


def test_own_password_needs_the_current_one(env: Env) -> None:
    c = env.client
    viewer = _bearer(env.tokens[Role.VIEWER])
    url = "/v1/accounts/viewer-user/password"
    r = c.post(url, headers=viewer, json={"password": "a new good password"})
    assert r.status_code == 400
    r = c.post(
        url, headers=viewer, json={"password": "a new good password", "current_password": "nope!"}
    )
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    assert env.accounts.show("viewer-user").failed_logins == 1
    r = c.post(
        url, headers=viewer, json={"password": "a new good password", "current_password": PW}
    )
    assert r.status_code == 200
    assert env.accounts.authenticate("viewer-user", "a new good password").role is Role.VIEWER
    r = c.post("/v1/accounts/target/password", headers=viewer, json={"password": "x" * 12})
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    admin = _bearer(env.tokens[Role.ADMIN])
    r = c.post("/v1/accounts/target/password", headers=admin, json={"password": "y" * 12})
    assert r.status_code == 200
    for entry in audit_entries(env.registry, AuditQuery(limit=100)):
        assert PW not in str(entry.to_dict())
        assert "a new good password" not in str(entry.to_dict())
