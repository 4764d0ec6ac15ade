"""Accounts, API tokens and sessions on a real registry, SQLite and PostgreSQL
(``registry_url``): migration 0008 up and down with no schema drift, and the store's
operations (unique names, token and session resolution, lockout, cascade) on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from argon2 import PasswordHasher
from sqlalchemy import delete, inspect

from clock import FakeClock
from fleet_server.accounts.passwords import Passwords
from fleet_server.accounts.roles import Role
from fleet_server.accounts.store import Accounts
from fleet_server.accounts.values import AccountPolicy
from fleet_server.errors import AccountExistsError, AccountLockedError, AuthenticationError
from fleet_server.registry.models import AccountRow
from fleet_server.registry.schema import METADATA
from fleet_server.registry.store import Registry

TABLES = {"accounts", "api_tokens", "sessions"}
PW = "correct horse battery"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(registry_url: str, clock: FakeClock) -> Iterator[Registry]:
    reg = Registry.open(registry_url, clock=clock.wall)
    reg.upgrade()
    yield reg
    reg.close()


@pytest.fixture
def accounts(registry: Registry, clock: FakeClock) -> Accounts:
    return Accounts(
        registry,
        clock.wall,
        passwords=Passwords(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)),
        policy=AccountPolicy(lockout_after=2, session_idle_seconds=60),
    )


def test_migration_0008_up_and_down_without_drift(registry: Registry, accounts: Accounts) -> None:
    assert registry.current_revision() == Registry.head_revision()
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert [d for d in diffs if any(t in repr(d) for t in TABLES)] == []
    accounts.create("alice", Role.ADMIN, PW)
    registry.downgrade("0007")
    assert not TABLES & set(inspect(registry.engine).get_table_names())
    registry.upgrade()
    assert set(inspect(registry.engine).get_table_names()) >= TABLES
    assert accounts.list() == []  # the downgrade dropped them


def test_store_round_trip_on_the_backend(
    registry: Registry, accounts: Accounts, clock: FakeClock
) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    with pytest.raises(AccountExistsError):
        accounts.create("alice", Role.VIEWER, PW)
    who = accounts.authenticate("alice", PW)
    token_id, secret = accounts.create_token("alice", Role.VIEWER, clock.utc + timedelta(days=1))
    resolved = accounts.resolve_token(secret)
    assert resolved is not None
    assert (resolved.account, resolved.role, resolved.credential) == (
        "alice",
        Role.VIEWER,
        token_id,
    )
    session = accounts.create_session(who, "10.1.2.3")
    found = accounts.resolve_session(session.cookie)
    assert found is not None
    assert found[1] == session.csrf_token
    clock.advance(60)
    assert accounts.resolve_session(session.cookie) is None  # idle
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            accounts.authenticate("alice", "wrong password!")
    with pytest.raises(AccountLockedError):
        accounts.authenticate("alice", PW)
    # Deleting an account row (never done by the store) takes its tokens and sessions along.
    with registry.write_session("test") as s:
        s.execute(delete(AccountRow).where(AccountRow.name == "alice"))
    assert accounts.list_tokens() == []
    assert accounts.resolve_token(secret) is None
