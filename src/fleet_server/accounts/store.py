"""Operator accounts, their API tokens and console sessions, over the registry.

Owns: ``Accounts``: create, list, show, disable, enable, set a role or a password,
``authenticate`` (a login, with a lockout after repeated failures), API tokens (create,
resolve, list, revoke) and sessions (create, resolve, end). Does not own: the tables
(``fleet_server.registry.tables.core``), hashing (``fleet_server.accounts.passwords``), the
roles (``fleet_server.accounts.roles``), the values it returns
(``fleet_server.accounts.values``), the session cookie and CSRF names and checks
(``fleet_server.accounts.sessions``) nor HTTP (``fleet_server.admin.auth``).

Credentials:
    An API token is ``eft_<id>_<secret>``: the id is public (listed, audited, revoked by),
    the secret is 32 random bytes (URL-safe base64) shown once and stored as its SHA-256. A
    session cookie is ``<id>.<secret>``, stored the same way; its CSRF token is derived from
    the secret, never stored. Lookups go by id and compare digests with
    ``hmac.compare_digest``.

Lockout: see ``AccountPolicy``; a successful login resets the count. An unknown account costs
one dummy argon2 verification, as a known one does, and is never locked (there is no row to
count on).

Every time comes from the injected ``clock`` (aware UTC ``datetime``).
"""

from __future__ import annotations

import builtins
import hmac
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session as DbSession

from fleet_server.accounts.passwords import Passwords, check_policy
from fleet_server.accounts.roles import Principal, Role, role_at_most
from fleet_server.accounts.sessions import (
    Session,
    csrf_of,
    digest,
    new_credential,
    split_credential,
    valid_id,
)
from fleet_server.accounts.values import (
    Account,
    AccountPolicy,
    ApiToken,
    check_name,
    valid_name,
)
from fleet_server.errors import (
    AccountError,
    AccountExistsError,
    AccountLockedError,
    AuthenticationError,
    LastAdminError,
    UnknownAccountError,
    UnknownApiTokenError,
)
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import (
    ACCOUNT_NAME_LEN,
    CLIENT_LEN,
    LABEL_LEN,
    AccountRow,
    ApiTokenRow,
    SessionRow,
)

__all__ = ["MAX_TOKEN_DAYS", "TOKEN_PREFIX", "Accounts"]

#: Every API token starts with it (secret scanners can find leaked ones).
TOKEN_PREFIX: Final = "eft_"  # noqa: S105 (a prefix, not a password)
#: The longest an API token may live.
MAX_TOKEN_DAYS: Final = 366 * 2
_NO_DIGEST: Final = "0" * 64


def _account(row: AccountRow) -> Account:
    return Account(
        row.name,
        Role(row.role),
        row.disabled,
        row.password_hash is not None,
        row.created_at,
        row.changed_at,
        row.failed_logins,
        row.locked_until,
        row.last_login_at,
    )


def _token(row: ApiTokenRow) -> ApiToken:
    return ApiToken(
        row.id,
        row.account,
        Role(row.role),
        row.label,
        row.created_at,
        row.expires_at,
        row.revoked_at,
        row.last_used_at,
    )


class Accounts:
    """Operator accounts, API tokens and sessions in ``registry``.

    Args:
        registry: where the rows live.
        clock: the wall clock (aware UTC ``datetime``).
        passwords: the hasher (argon2id with argon2-cffi's parameters by default).
        policy: lockout and session timeouts.
    """

    def __init__(
        self,
        registry: Registry,
        clock: Callable[[], datetime],
        *,
        passwords: Passwords | None = None,
        policy: AccountPolicy | None = None,
    ) -> None:
        """Serve accounts from ``registry`` at ``clock()``."""
        self._registry = registry
        self._clock = clock
        self._passwords = passwords or Passwords()
        self._policy = policy or AccountPolicy()

    @property
    def policy(self) -> AccountPolicy:
        """The lockout and session timeouts in force."""
        return self._policy

    def now(self) -> datetime:
        """The store's clock reading (token expiries are computed from it)."""
        return self._clock()

    # ----------------------------------------------------------------- accounts
    def create(self, name: str, role: Role, password: str | None = None) -> Account:
        """Create an enabled account (``password`` ``None``: API tokens only, no login).

        Raises:
            AccountError: a bad name.
            PasswordPolicyError: the password breaks the policy.
            AccountExistsError: the name is taken.
            RegistryUnavailableError: the database failed.
        """
        check_name(name)
        encoded = None
        if password is not None:
            check_policy(password)
            encoded = self._passwords.hash(password)
        now = self._clock()
        with self._registry.write_session("creating an account") as s:
            if s.get(AccountRow, name) is not None:
                raise AccountExistsError(f"account {name!r} exists")
            row = AccountRow(
                name=name,
                role=str(role),
                password_hash=encoded,
                disabled=False,
                created_at=now,
                changed_at=now,
                failed_logins=0,
            )
            s.add(row)
            s.flush()
            return _account(row)

    def list(self) -> list[Account]:
        """Every account, by name.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        with self._registry.read_session("listing accounts") as s:
            return [_account(r) for r in s.scalars(select(AccountRow).order_by(AccountRow.name))]

    def show(self, name: str) -> Account:
        """The account ``name``.

        Raises:
            UnknownAccountError: no such account.
            RegistryUnavailableError: the database failed.
        """
        with self._registry.read_session("reading an account") as s:
            return _account(self._row(s, name, lock=False))

    def disable(self, name: str) -> Account:
        """Disable ``name``: it cannot log in, its tokens and sessions stop working (its
        sessions are ended).

        Raises:
            UnknownAccountError: no such account.
            LastAdminError: it is the last enabled admin.
            RegistryUnavailableError: the database failed.
        """
        now = self._clock()
        with self._registry.write_session("disabling an account") as s:
            row = self._row(s, name)
            if row.role == Role.ADMIN and not row.disabled:
                self._keep_an_admin(s, name)
            row.disabled = True
            row.changed_at = now
            self._end_sessions(s, name, now)
            return _account(row)

    def enable(self, name: str) -> Account:
        """Enable ``name`` again (and clear its lockout).

        Raises:
            UnknownAccountError: no such account.
            RegistryUnavailableError: the database failed.
        """
        with self._registry.write_session("enabling an account") as s:
            row = self._row(s, name)
            row.disabled = False
            row.failed_logins = 0
            row.locked_until = None
            row.changed_at = self._clock()
            return _account(row)

    def set_role(self, name: str, role: Role) -> Account:
        """Give ``name`` the role ``role`` (its tokens never act above it).

        Raises:
            UnknownAccountError: no such account.
            LastAdminError: it is the last enabled admin and ``role`` is not admin.
            RegistryUnavailableError: the database failed.
        """
        with self._registry.write_session("changing a role") as s:
            row = self._row(s, name)
            if row.role == Role.ADMIN and role != Role.ADMIN and not row.disabled:
                self._keep_an_admin(s, name)
            row.role = str(role)
            row.changed_at = self._clock()
            return _account(row)

    def set_password(self, name: str, password: str) -> Account:
        """Set the password of ``name``, clear its lockout and end its sessions.

        Raises:
            PasswordPolicyError: the password breaks the policy.
            UnknownAccountError: no such account.
            RegistryUnavailableError: the database failed.
        """
        check_policy(password)
        encoded = self._passwords.hash(password)
        now = self._clock()
        with self._registry.write_session("setting a password") as s:
            row = self._row(s, name)
            row.password_hash = encoded
            row.failed_logins = 0
            row.locked_until = None
            row.changed_at = now
            self._end_sessions(s, name, now)
            return _account(row)

    def authenticate(self, name: str, password: str) -> Principal:
        """The principal of ``name`` if ``password`` is its password (a login).

        A failure counts towards the lockout; a success resets the count and replaces the hash
        when the hashing parameters changed.

        Raises:
            AuthenticationError: unknown account, wrong password, no password, disabled.
            AccountLockedError: too many failures in a row; try again later.
            RegistryUnavailableError: the database failed.
        """
        valid = valid_name(name)
        with self._registry.read_session("reading an account") as s:
            row = s.get(AccountRow, name) if valid else None
            encoded = None if row is None else row.password_hash
            disabled = row is None or row.disabled
            locked_until = None if row is None else row.locked_until
        ok = self._passwords.verify(encoded, password if isinstance(password, str) else "")
        now = self._clock()
        if locked_until is not None and now < locked_until:
            raise AccountLockedError("too many failed logins: try again later")
        if row is None or encoded is None:
            raise AuthenticationError("login failed")
        if not ok or disabled:
            self._count_failure(name, now)
            raise AuthenticationError("login failed")
        rehash = self._passwords.hash(password) if self._passwords.needs_rehash(encoded) else None
        with self._registry.write_session("recording a login") as s:
            fresh = self._row(s, name)
            fresh.failed_logins = 0
            fresh.locked_until = None
            fresh.last_login_at = now
            if rehash is not None and fresh.password_hash == encoded:
                fresh.password_hash = rehash
            # Not a credential yet: ``create_session`` turns it into a session's principal.
            return Principal(name, Role(fresh.role), "password", "")

    def _count_failure(self, name: str, now: datetime) -> None:
        p = self._policy
        with self._registry.write_session("recording a failed login") as s:
            row = self._row(s, name)
            row.failed_logins += 1
            over = row.failed_logins - p.lockout_after
            if over >= 0:
                seconds = min(p.lockout_seconds * 2 ** min(over, 30), p.max_lockout_seconds)
                row.locked_until = now + timedelta(seconds=seconds)

    # ----------------------------------------------------------------- API tokens
    def create_token(
        self, account: str, role: Role, expires: datetime, label: str = ""
    ) -> tuple[str, str]:
        """A new API token of ``account`` acting as ``role`` until ``expires``:
        ``(token_id, secret)``, where ``secret`` is the whole bearer value (shown once).

        Raises:
            UnknownAccountError: no such account.
            AccountError: the account is disabled, ``role`` grants something the account's
                role does not, ``expires`` is not in the future or more than two years away,
                or the label is too long.
            RegistryUnavailableError: the database failed.
        """
        now = self._clock()
        if expires.tzinfo is None or not now < expires <= now + timedelta(days=MAX_TOKEN_DAYS):
            raise AccountError(f"a token expires in the future, within {MAX_TOKEN_DAYS} days")
        if len(label) > LABEL_LEN:
            raise AccountError(f"a token label has at most {LABEL_LEN} characters")
        token_id, secret = new_credential()
        with self._registry.write_session("creating an API token") as s:
            row = self._row(s, account)
            if row.disabled:
                raise AccountError(f"account {account!r} is disabled")
            if not role_at_most(role, Role(row.role)):
                raise AccountError(f"a token of {account!r} cannot have a role above {row.role}")
            s.add(
                ApiTokenRow(
                    id=token_id,
                    account=account,
                    role=str(role),
                    label=label,
                    secret_sha256=digest(secret),
                    created_at=now,
                    expires_at=expires,
                )
            )
        return token_id, f"{TOKEN_PREFIX}{token_id}_{secret}"

    def resolve_token(self, bearer: str) -> Principal | None:
        """The principal a bearer token value stands for, or ``None``: malformed, unknown,
        wrong secret, revoked, expired, or its account disabled. Its role is the token's, never
        above the account's current role. Records when it was last used (at most once a
        minute).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        parts = (
            split_credential(bearer[len(TOKEN_PREFIX) :], "_")
            if bearer.startswith(TOKEN_PREFIX)
            else None
        )
        if parts is None:
            return None
        token_id, secret = parts
        now = self._clock()
        with self._registry.read_session("resolving an API token") as s:
            tok = s.get(ApiTokenRow, token_id)
            acc = None if tok is None else s.get(AccountRow, tok.account)
            stored = _NO_DIGEST if tok is None else tok.secret_sha256
            match = hmac.compare_digest(digest(secret).encode(), stored.encode())
            if tok is None or acc is None or not match:
                return None
            if tok.revoked_at is not None or now >= tok.expires_at or acc.disabled:
                return None
            role, ceiling = Role(tok.role), Role(acc.role)
            if not role_at_most(role, ceiling):  # the account was given a lower role since
                role = ceiling if role_at_most(ceiling, role) else Role.VIEWER
            touch = tok.last_used_at is None or now - tok.last_used_at >= timedelta(minutes=1)
        if touch:
            with self._registry.write_session("recording an API token's use") as w:
                w.execute(
                    update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=now)
                )
        return Principal(acc.name, role, "token", token_id)

    def list_tokens(self, account: str | None = None) -> builtins.list[ApiToken]:
        """The tokens of ``account`` (every account's with ``None``), newest first, including
        revoked and expired ones.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(ApiTokenRow).order_by(ApiTokenRow.created_at.desc(), ApiTokenRow.id)
        if account is not None:
            stmt = stmt.where(ApiTokenRow.account == account)
        with self._registry.read_session("listing API tokens") as s:
            return [_token(r) for r in s.scalars(stmt)]

    def token(self, token_id: str) -> ApiToken:
        """The token ``token_id``.

        Raises:
            UnknownApiTokenError: no such token.
            RegistryUnavailableError: the database failed.
        """
        with self._registry.read_session("reading an API token") as s:
            row = s.get(ApiTokenRow, token_id) if valid_id(token_id) else None
            if row is None:
                raise UnknownApiTokenError("no such API token")
            return _token(row)

    def revoke_token(self, token_id: str) -> ApiToken:
        """Revoke ``token_id`` (idempotent: a revoked token keeps its first revocation time).

        Raises:
            UnknownApiTokenError: no such token.
            RegistryUnavailableError: the database failed.
        """
        with self._registry.write_session("revoking an API token") as s:
            row = s.get(ApiTokenRow, token_id) if valid_id(token_id) else None
            if row is None:
                raise UnknownApiTokenError("no such API token")
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return _token(row)

    # ----------------------------------------------------------------- sessions
    def create_session(self, principal: Principal, client: str) -> Session:
        """A new console session for ``principal`` (after ``authenticate``) from ``client``.

        Raises:
            UnknownAccountError: the account does not exist (any more).
            RegistryUnavailableError: the database failed.
        """
        now = self._clock()
        session_id, secret = new_credential()
        expires = now + timedelta(seconds=self._policy.session_absolute_seconds)
        with self._registry.write_session("creating a session") as s:
            self._row(s, principal.account)
            s.add(
                SessionRow(
                    id=session_id,
                    account=principal.account,
                    secret_sha256=digest(secret),
                    client=client[:CLIENT_LEN],
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires,
                )
            )
        return Session(session_id, csrf_of(secret), expires, f"{session_id}.{secret}")

    def resolve_session(self, cookie_value: str) -> tuple[Principal, str] | None:
        """``(principal, csrf_token)`` of a live session, or ``None``: malformed, unknown,
        wrong secret, ended, idle longer than ``session_idle_seconds``, older than
        ``session_absolute_seconds``, or its account disabled. The role is the account's
        current one. Each use moves the idle deadline.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        parts = split_credential(cookie_value, ".")
        if parts is None:
            return None
        session_id, secret = parts
        now = self._clock()
        idle = timedelta(seconds=self._policy.session_idle_seconds)
        with self._registry.write_session("resolving a session") as s:
            row = s.get(SessionRow, session_id)
            stored = _NO_DIGEST if row is None else row.secret_sha256
            match = hmac.compare_digest(digest(secret).encode(), stored.encode())
            if row is None or not match or row.ended_at is not None:
                return None
            if now >= row.expires_at or now - row.last_seen_at >= idle:
                row.ended_at = now
                return None
            acc = s.get(AccountRow, row.account)
            if acc is None or acc.disabled:
                return None
            row.last_seen_at = now
            return Principal(acc.name, Role(acc.role), "session", session_id), csrf_of(secret)

    def end_session(self, session_id: str) -> None:
        """End the session ``session_id`` (a logout; unknown or ended: nothing happens).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        if not valid_id(session_id):
            return
        with self._registry.write_session("ending a session") as s:
            row = s.get(SessionRow, session_id)
            if row is not None and row.ended_at is None:
                row.ended_at = self._clock()

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _row(s: DbSession, name: str, *, lock: bool = True) -> AccountRow:
        # Locked (PostgreSQL: FOR UPDATE) so concurrent changes of one account, e.g. two failed
        # logins counting at once, apply one after the other; SQLite's writer is already one.
        row = s.get(AccountRow, name, with_for_update=lock) if valid_name(name) else None
        if row is None:
            raise UnknownAccountError(f"no account {name[:ACCOUNT_NAME_LEN]!r}")
        return row

    @staticmethod
    def _keep_an_admin(s: DbSession, name: str) -> None:
        others = s.scalars(
            select(AccountRow.name)
            .where(
                AccountRow.role == str(Role.ADMIN),
                AccountRow.disabled.is_(False),
                AccountRow.name != name,
            )
            .with_for_update()  # two admins disabling each other: the second one waits
        ).first()
        if others is None:
            raise LastAdminError(f"{name!r} is the last enabled admin account")

    @staticmethod
    def _end_sessions(s: DbSession, name: str, now: datetime) -> None:
        s.execute(
            update(SessionRow)
            .where(SessionRow.account == name, SessionRow.ended_at.is_(None))
            .values(ended_at=now)
        )
