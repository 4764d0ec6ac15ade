"""Operator accounts (fleet_server.accounts): the roles matrix, argon2id hashing, API tokens
(expiry, revocation, disabled accounts, role ceilings), sessions (idle and absolute timeouts),
CSRF comparison, the lockout, and hostile credential values. Time moves only by FakeClock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import given, settings
from hypothesis import strategies as st

from clock import FakeClock
from fleet_server.accounts.passwords import MAX_PASSWORD_CHARS, Passwords, check_policy
from fleet_server.accounts.roles import (
    ROLE_PERMISSIONS,
    ROUTE_PERMISSIONS,
    Permission,
    Principal,
    Role,
    allows,
    permission_for,
    role_at_most,
)
from fleet_server.accounts.sessions import csrf_matches, split_credential
from fleet_server.accounts.store import TOKEN_PREFIX, Accounts
from fleet_server.accounts.values import AccountPolicy, check_name, parse_role
from fleet_server.errors import (
    AccountError,
    AccountExistsError,
    AccountLockedError,
    AuthenticationError,
    LastAdminError,
    PasswordPolicyError,
    UnknownAccountError,
    UnknownApiTokenError,
)
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import AccountRow, ApiTokenRow

PW = "correct horse battery"
#: Cheap argon2id parameters: the tests check behaviour, not cost.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.upgrade()
    yield reg
    reg.close()


@pytest.fixture
def accounts(registry: Registry, clock: FakeClock) -> Accounts:
    return Accounts(registry, clock.wall, passwords=Passwords(FAST))


# Roles (pure).
MATRIX = {
    Role.ADMIN: set(Permission),
    Role.RELEASE_MANAGER: {
        Permission.READ,
        Permission.SELF,
        Permission.AUDIT_READ,
        Permission.MODELS_PUBLISH,
        Permission.RELEASES,
        Permission.ROLLOUTS_CONTROL,
        Permission.EVALSETS_WRITE,
        Permission.SCHEDULES,
        Permission.DATASETS,
    },
    Role.OPERATOR: {
        Permission.READ,
        Permission.SELF,
        Permission.AUDIT_READ,
        Permission.DEVICES_WRITE,
        Permission.DEVICES_REVOKE,
        Permission.DIAGNOSTICS,
        Permission.ROLLOUTS_CONTROL,
        Permission.SCHEDULES,
    },
    Role.VIEWER: {Permission.READ, Permission.SELF},
}


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("permission", list(Permission))
def test_the_roles_matrix_is_the_documented_one(role: Role, permission: Permission) -> None:
    assert allows(role, permission) == (permission in MATRIX[role])


def test_only_admin_holds_keys_and_accounts_and_unlisted_routes_are_refused() -> None:
    for perm in (Permission.KEYS, Permission.ACCOUNTS_ADMIN):
        assert [r for r in Role if allows(r, perm)] == [Role.ADMIN]
    assert permission_for("DELETE /v1/everything") is None
    assert permission_for("GET /healthz") is None  # unguarded: never asks
    assert set(ROUTE_PERMISSIONS.values()) <= set(Permission)
    assert all(ROLE_PERMISSIONS[Role.VIEWER] <= ROLE_PERMISSIONS[r] for r in Role)


def test_role_ceiling_is_a_subset_of_permissions() -> None:
    assert role_at_most(Role.VIEWER, Role.OPERATOR)
    assert role_at_most(Role.OPERATOR, Role.ADMIN)
    # Neither of the two middle roles holds everything the other does.
    assert not role_at_most(Role.OPERATOR, Role.RELEASE_MANAGER)
    assert not role_at_most(Role.RELEASE_MANAGER, Role.OPERATOR)
    assert not role_at_most(Role.ADMIN, Role.RELEASE_MANAGER)


# Names, roles, passwords (pure).
@pytest.mark.parametrize(
    "name",
    ["", "A", "-x", ".x", "a b", "a/b", "é", "a" * 65, "x\n", "x\x00", "<script>", "a:b"],
)
def test_bad_account_names_are_refused(name: str) -> None:
    with pytest.raises(AccountError):
        check_name(name)


def test_good_names_and_roles() -> None:
    assert check_name("ops.alice-2_b") == "ops.alice-2_b"
    assert check_name("a" * 64) == "a" * 64
    assert parse_role("release-manager") is Role.RELEASE_MANAGER
    with pytest.raises(AccountError, match="unknown role"):
        parse_role("root")


@pytest.mark.parametrize(
    "password",
    ["", "short", "x" * 11, "y" * (MAX_PASSWORD_CHARS + 1), "twelve chars\n", "tab\tinside pw!"],
)
def test_password_policy_refuses(password: str) -> None:
    with pytest.raises(PasswordPolicyError):
        check_policy(password)


def test_hashing_is_argon2id_and_rehash_follows_the_parameters() -> None:
    old = Passwords(FAST)
    encoded = old.hash(PW)
    assert encoded.startswith("$argon2id$")
    assert PW not in encoded
    assert old.verify(encoded, PW)
    assert not old.verify(encoded, PW + "!")
    assert not old.verify(None, PW)  # unknown account: a dummy verification, False
    assert not old.verify("not-a-hash", PW)
    assert not old.verify(encoded, "x" * (MAX_PASSWORD_CHARS + 1))
    assert not old.needs_rehash(encoded)
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    assert stronger.needs_rehash(encoded)
    assert stronger.verify(encoded, PW)  # old hashes still verify


def test_csrf_compare() -> None:
    assert csrf_matches("ab" * 32, "ab" * 32)
    for given_value in (None, "", "ab" * 31, "AB" * 32, "ab" * 32 + "x", "x" * 1000):
        assert not csrf_matches(given_value, "ab" * 32)


# Credential parsing: hostile values never raise and never resolve.
HOSTILE = [
    "",
    "Bearer x",
    TOKEN_PREFIX,
    TOKEN_PREFIX + "_",
    TOKEN_PREFIX + "0123456789abcdef",
    TOKEN_PREFIX + "0123456789abcdef_",
    TOKEN_PREFIX + "0123456789ABCDEF_" + "a" * 43,
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 42,
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 44,
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 42 + "=",
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 42 + "\x00",
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 42 + "é",
    TOKEN_PREFIX + "../../etc/passwd_" + "a" * 43,
    TOKEN_PREFIX + "0123456789abcdef_" + "a" * 43 + "' OR 1=1 --",
    "x" * 100_000,
    "0123456789abcdef." + "a" * 43,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_token_and_cookie_values_resolve_to_nobody(accounts: Accounts, value: str) -> None:
    accounts.create("alice", Role.ADMIN, PW)
    assert accounts.resolve_token(value) is None
    assert accounts.resolve_session(value) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["_", "."]))
def test_split_credential_never_raises(value: str, sep: str) -> None:
    parts = split_credential(value, sep)
    if parts is not None:
        assert f"{parts[0]}{sep}{parts[1]}" == value
        assert len(parts[0]) == 16


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ("alice", ""),
        ("alice", "x" * 100_000),
        ("alice", "correct horse batter"),
        ("ALICE", PW),
        ("alice\x00", PW),
        ("", PW),
        ("x" * 10_000, PW),
        ("' OR 1=1 --", PW),
        ("nobody", PW),
    ],
)
def test_hostile_logins_fail_with_one_error(accounts: Accounts, name: str, password: str) -> None:
    accounts.create("alice", Role.ADMIN, PW)
    with pytest.raises(AuthenticationError) as err:
        accounts.authenticate(name, password)
    assert type(err.value) is AuthenticationError
    assert str(err.value) == "login failed"


# Accounts.
def test_create_show_list_and_no_hash_in_the_view(accounts: Accounts) -> None:
    created = accounts.create("alice", Role.OPERATOR, PW)
    accounts.create("bot", Role.VIEWER)  # tokens only
    assert created.has_password
    assert not created.disabled
    assert [a.name for a in accounts.list()] == ["alice", "bot"]
    assert accounts.show("bot").has_password is False
    assert PW not in str(created.to_dict())
    assert "argon2" not in str(created.to_dict())
    with pytest.raises(AccountExistsError):
        accounts.create("alice", Role.VIEWER, PW)
    with pytest.raises(UnknownAccountError):
        accounts.show("carol")
    with pytest.raises(AuthenticationError):
        accounts.authenticate("bot", "")  # no password: no login


def test_login_rehashes_when_parameters_change(registry: Registry, clock: FakeClock) -> None:
    Accounts(registry, clock.wall, passwords=Passwords(FAST)).create("alice", Role.ADMIN, PW)
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    accounts = Accounts(registry, clock.wall, passwords=stronger)
    assert accounts.authenticate("alice", PW) == Principal("alice", Role.ADMIN, "password", "")
    with registry.read_session("test") as s:
        row = s.get(AccountRow, "alice")
        assert row is not None
        assert row.password_hash is not None
        assert not stronger.needs_rehash(row.password_hash)
    assert accounts.show("alice").last_login_at == clock.utc


def test_lockout_backs_off_and_a_success_resets(registry: Registry, clock: FakeClock) -> None:
    policy = AccountPolicy(lockout_after=3, lockout_seconds=60, max_lockout_seconds=200)
    accounts = Accounts(registry, clock.wall, passwords=Passwords(FAST), policy=policy)
    accounts.create("alice", Role.ADMIN, PW)
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            accounts.authenticate("alice", "wrong password!")
    assert accounts.authenticate("alice", PW).account == "alice"  # resets the count
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            accounts.authenticate("alice", "wrong password!")
    with pytest.raises(AccountLockedError):
        accounts.authenticate("alice", PW)  # even the right password, while locked
    clock.advance(59)
    with pytest.raises(AccountLockedError):
        accounts.authenticate("alice", PW)
    clock.advance(1)
    with pytest.raises(AuthenticationError):
        accounts.authenticate("alice", "wrong password!")  # 4th: 120 s
    clock.advance(119)
    with pytest.raises(AccountLockedError):
        accounts.authenticate("alice", PW)
    clock.advance(1)
    with pytest.raises(AuthenticationError):
        accounts.authenticate("alice", "wrong password!")  # 5th: 240 s, capped at 200
    assert accounts.show("alice").locked_until == clock.utc + timedelta(seconds=200)
    accounts.enable("alice")  # an admin clears it
    assert accounts.authenticate("alice", PW).role is Role.ADMIN
    assert accounts.show("alice").failed_logins == 0


def test_disabled_account_cannot_log_in_and_the_last_admin_is_kept(accounts: Accounts) -> None:
    accounts.create("root", Role.ADMIN, PW)
    accounts.create("alice", Role.OPERATOR, PW)
    with pytest.raises(LastAdminError):
        accounts.disable("root")
    with pytest.raises(LastAdminError):
        accounts.set_role("root", Role.VIEWER)
    accounts.disable("alice")
    with pytest.raises(AuthenticationError):
        accounts.authenticate("alice", PW)
    accounts.enable("alice")
    accounts.set_role("alice", Role.ADMIN)
    accounts.disable("root")  # another admin exists now
    assert accounts.show("root").disabled


# API tokens.
def test_token_resolves_until_expiry_and_is_stored_hashed(
    accounts: Accounts, registry: Registry, clock: FakeClock
) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    token_id, secret = accounts.create_token("alice", Role.VIEWER, clock.utc + timedelta(hours=1))
    assert secret.startswith(TOKEN_PREFIX + token_id + "_")
    assert accounts.resolve_token(secret) == Principal("alice", Role.VIEWER, "token", token_id)
    with registry.read_session("test") as s:
        row = s.get(ApiTokenRow, token_id)
        assert row is not None
        assert secret.split("_", 2)[2] not in row.secret_sha256
    assert accounts.resolve_token(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    clock.advance(3599)
    assert accounts.resolve_token(secret) is not None
    assert accounts.list_tokens("alice")[0].last_used_at is not None
    clock.advance(1)
    assert accounts.resolve_token(secret) is None


def test_revoked_token_and_disabled_account_are_refused(
    accounts: Accounts, clock: FakeClock
) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    accounts.create("root", Role.ADMIN, PW)
    later = clock.utc + timedelta(days=1)
    t1, s1 = accounts.create_token("alice", Role.OPERATOR, later)
    t2, s2 = accounts.create_token("alice", Role.OPERATOR, later)
    first = accounts.revoke_token(t1).revoked_at
    clock.advance(10)
    assert accounts.revoke_token(t1).revoked_at == first  # idempotent
    assert accounts.resolve_token(s1) is None
    assert accounts.resolve_token(s2) is not None
    accounts.disable("alice")
    assert accounts.resolve_token(s2) is None
    accounts.enable("alice")
    assert accounts.resolve_token(s2) is not None
    with pytest.raises(UnknownApiTokenError):
        accounts.revoke_token("0123456789abcdef")
    with pytest.raises(UnknownApiTokenError):
        accounts.revoke_token("'; DROP TABLE api_tokens; --")
    assert {t.id for t in accounts.list_tokens("alice")} == {t1, t2}
    assert accounts.list_tokens("root") == []


def test_token_role_never_exceeds_the_account(accounts: Accounts, clock: FakeClock) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    accounts.create("root", Role.ADMIN, PW)
    later = clock.utc + timedelta(days=1)
    for role in (Role.ADMIN, Role.RELEASE_MANAGER):
        with pytest.raises(AccountError, match="above"):
            accounts.create_token("alice", role, later)
    _, admin_token = accounts.create_token("root", Role.ADMIN, later)
    _, op_token = accounts.create_token("root", Role.OPERATOR, later)
    accounts.create("root2", Role.ADMIN, PW)
    accounts.set_role("root", Role.RELEASE_MANAGER)  # demoted: its tokens follow
    admin_now = accounts.resolve_token(admin_token)
    op_now = accounts.resolve_token(op_token)
    assert admin_now is not None
    assert admin_now.role is Role.RELEASE_MANAGER
    assert op_now is not None
    assert op_now.role is Role.VIEWER


@pytest.mark.parametrize("days", [0, -1, 733])
def test_token_expiry_bounds(accounts: Accounts, clock: FakeClock, days: int) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    with pytest.raises(AccountError, match="expires"):
        accounts.create_token("alice", Role.VIEWER, clock.utc + timedelta(days=days))


# Sessions.
def test_session_idle_and_absolute_timeouts(registry: Registry, clock: FakeClock) -> None:
    policy = AccountPolicy(session_idle_seconds=600, session_absolute_seconds=1800)
    accounts = Accounts(registry, clock.wall, passwords=Passwords(FAST), policy=policy)
    accounts.create("alice", Role.OPERATOR, PW)
    who = accounts.authenticate("alice", PW)
    session = accounts.create_session(who, "10.0.0.7")
    assert session.expires_at == clock.utc + timedelta(seconds=1800)
    found = accounts.resolve_session(session.cookie)
    assert found == (Principal("alice", Role.OPERATOR, "session", session.id), session.csrf_token)
    for _ in range(2):  # used every 599 s: the idle deadline moves
        clock.advance(599)
        assert accounts.resolve_session(session.cookie) is not None
    clock.advance(599)  # 1797 s after the login
    assert accounts.resolve_session(session.cookie) is not None
    clock.advance(3)  # 1800 s: the absolute limit
    assert accounts.resolve_session(session.cookie) is None
    idle = accounts.create_session(who, "10.0.0.7")
    clock.advance(600)
    assert accounts.resolve_session(idle.cookie) is None
    clock.advance(-600)
    assert accounts.resolve_session(idle.cookie) is None  # ended, stays ended


def test_session_end_disable_and_password_change(accounts: Accounts) -> None:
    accounts.create("alice", Role.OPERATOR, PW)
    accounts.create("root", Role.ADMIN, PW)
    who = accounts.authenticate("alice", PW)
    s1, s2, s3 = (accounts.create_session(who, "c") for _ in range(3))
    assert len({s1.csrf_token, s2.csrf_token, s3.csrf_token}) == 3
    accounts.end_session(s1.id)
    accounts.end_session("not-an-id")
    assert accounts.resolve_session(s1.cookie) is None
    assert accounts.resolve_session(s2.cookie) is not None
    accounts.set_role("alice", Role.VIEWER)  # a session follows the account's role
    found = accounts.resolve_session(s2.cookie)
    assert found is not None
    assert found[0].role is Role.VIEWER
    accounts.set_password("alice", "another good password")
    assert accounts.resolve_session(s2.cookie) is None
    s4 = accounts.create_session(who, "c")
    accounts.disable("alice")
    assert accounts.resolve_session(s4.cookie) is None
    assert accounts.resolve_session(s3.cookie) is None
    assert PW not in s4.cookie
    assert s4.id in s4.cookie


# Properties: no credential value, however malformed, raises or resolves.
@pytest.fixture(scope="module")
def shared_accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accounts]:
    reg = Registry.open(f"sqlite:///{tmp_path_factory.mktemp('prop') / 'registry.db'}")
    reg.upgrade()
    clock = FakeClock()
    accounts = Accounts(reg, clock.wall, passwords=Passwords(FAST))
    accounts.create("alice", Role.ADMIN, PW)
    accounts.create_token("alice", Role.VIEWER, clock.utc + timedelta(days=1))
    yield accounts
    reg.close()


_CREDENTIAL = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda ident, sep, secret: f"{TOKEN_PREFIX}{ident}{sep}{secret}",
        st.text("0123456789abcdefABCDEF_", max_size=20),
        st.sampled_from(["_", ".", ""]),
        st.text("AZaz09_-=.+/\x00é", max_size=50),
    ),
)


@settings(max_examples=200, deadline=None)
@given(value=_CREDENTIAL)
def test_any_credential_value_resolves_to_nobody(shared_accounts: Accounts, value: str) -> None:
    assert shared_accounts.resolve_token(value) is None
    assert shared_accounts.resolve_session(value) is None


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=80), password=st.text(max_size=300))
def test_any_login_fails_with_the_one_error(
    shared_accounts: Accounts, name: str, password: str
) -> None:
    with pytest.raises(AuthenticationError) as err:
        shared_accounts.authenticate(name, password)
    assert str(err.value) in {"login failed", "too many failed logins: try again later"}
