"""Console logins and logouts in the audit log: who logged in and out, and failed logins to
accounts that exist, each as an attempt and an outcome; nothing for names no account has nor
for each attempt at a locked account (anyone could add those rows); no login without its
entry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_world import PASSWORD, ConsoleWorld, login
from starlette.testclient import TestClient

from fleet_server.errors import RegistryUnavailableError
from fleet_server.registry.audit import AuditEntry, AuditQuery, audit_entries


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def _console_entries(world: ConsoleWorld) -> list[AuditEntry]:
    entries = audit_entries(world.registry, AuditQuery(limit=1000))
    return sorted((e for e in entries if "/console/" in e.action), key=lambda e: e.id)


def _attempt(client: TestClient, name: str, password: str) -> int:
    r = client.post(
        "/console/login",
        data={"name": name, "password": password, "next": "/console/"},
        follow_redirects=False,
    )
    return r.status_code


def _outcomes(world: ConsoleWorld) -> list[tuple[str, str, str, int | None, str]]:
    return [
        (e.actor, e.action, e.object, e.status, e.code)
        for e in _console_entries(world)
        if e.phase == "outcome"
    ]


def test_a_login_and_a_logout_are_recorded(client: TestClient, world: ConsoleWorld) -> None:
    csrf = login(client, "ops")
    r = client.post("/console/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert _outcomes(world) == [
        ("session:ops", "POST /console/login", "account:ops", 303, ""),
        ("session:ops", "POST /console/logout", "account:ops", 303, ""),
    ]
    entries = _console_entries(world)
    assert [e.phase for e in entries] == ["attempt", "outcome"] * 2
    assert entries[0].request_id == entries[1].request_id != entries[2].request_id
    assert {e.client for e in entries} == {"testclient"}
    assert all(PASSWORD not in str(e.to_dict()) for e in entries)


def test_a_failed_login_to_an_account_that_exists_is_recorded(
    client: TestClient, world: ConsoleWorld
) -> None:
    assert _attempt(client, "ada", "not the password") == 401
    assert _outcomes(world) == [
        ("unauthenticated:", "POST /console/login", "account:ada", 401, "login_failed")
    ]


@pytest.mark.parametrize(
    "name",
    ["nobody", "", "x" * 500, "<script>alert(1)</script>", "ada\x00", "ADA"],
    ids=["unknown", "empty", "long", "markup", "nul", "case"],
)
def test_failed_logins_for_names_no_account_has_leave_no_rows(
    client: TestClient, world: ConsoleWorld, name: str
) -> None:
    for _ in range(3):
        assert _attempt(client, name, "whatever") == 401
    assert _console_entries(world) == []


def test_a_locked_account_records_the_failures_that_locked_it_not_every_attempt_after(
    client: TestClient, world: ConsoleWorld
) -> None:
    limit = world.accounts.policy.lockout_after
    for _ in range(limit):
        assert _attempt(client, "rel", "wrong") == 401
    for _ in range(10):
        assert _attempt(client, "rel", PASSWORD) == 429  # locked, even with the password
    outcomes = _outcomes(world)
    assert len(outcomes) == limit
    assert {o[3] for o in outcomes} == {401}


def test_no_login_without_its_entry(
    client: TestClient, world: ConsoleWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailableError("the audit log cannot be written")

    monkeypatch.setattr(world.auditor, "event", unavailable)
    r = client.post(
        "/console/login",
        data={"name": "ada", "password": PASSWORD, "next": "/console/"},
        follow_redirects=False,
    )
    assert r.status_code == 503
    assert "set-cookie" not in r.headers
    # The session it had made is ended: no page opens with it.
    assert client.get("/console/", follow_redirects=False).status_code == 303
    monkeypatch.undo()
    login(client, "ada")  # and a later login with the log writable works


def test_a_database_failure_during_login_is_a_typed_answer_not_a_crash(
    client: TestClient, world: ConsoleWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailableError("the audit log cannot be written")

    monkeypatch.setattr(world.auditor, "event", unavailable)
    assert _attempt(client, "ada", "not the password") == 401  # failed either way, logged

    def down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailableError("the registry is down")

    monkeypatch.setattr(world.accounts, "authenticate", down)
    assert _attempt(client, "ada", PASSWORD) == 503
