"""The values the accounts store returns and takes: accounts, API tokens, the policy.

Owns: ``Account`` and ``ApiToken`` as shown (never a password hash nor a secret),
``AccountPolicy`` (lockout and session timeouts), account names (``check_name``) and role
names (``parse_role``). Pure. Does not own their storage (``fleet_server.accounts.store``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from fleet_server.accounts.roles import Role
from fleet_server.errors import AccountError

__all__ = [
    "MAX_NAME_CHARS",
    "Account",
    "AccountPolicy",
    "ApiToken",
    "check_name",
    "parse_role",
    "valid_name",
]

MAX_NAME_CHARS: Final = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


@dataclass(frozen=True)
class AccountPolicy:
    """Lockout and session timeouts (the defaults suit an operator console).

    After ``lockout_after`` failed logins in a row an account refuses logins for
    ``lockout_seconds``, doubling with each further failure up to ``max_lockout_seconds``.
    A session ends after ``session_idle_seconds`` without use or ``session_absolute_seconds``
    after the login, whichever comes first.
    """

    lockout_after: int = 5
    lockout_seconds: int = 60
    max_lockout_seconds: int = 3600
    session_idle_seconds: int = 30 * 60
    session_absolute_seconds: int = 12 * 3600


@dataclass(frozen=True)
class Account:
    """An account as shown (never its password hash)."""

    name: str
    role: Role
    disabled: bool
    has_password: bool
    created_at: datetime
    changed_at: datetime
    failed_logins: int
    locked_until: datetime | None
    last_login_at: datetime | None

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "name": self.name,
            "role": str(self.role),
            "disabled": self.disabled,
            "has_password": self.has_password,
            "created_at": _iso(self.created_at),
            "changed_at": _iso(self.changed_at),
            "failed_logins": self.failed_logins,
            "locked_until": _iso(self.locked_until),
            "last_login_at": _iso(self.last_login_at),
        }


@dataclass(frozen=True)
class ApiToken:
    """An API token as listed (never its secret)."""

    id: str
    account: str
    role: Role
    label: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "id": self.id,
            "account": self.account,
            "role": str(self.role),
            "label": self.label,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at),
        }


def parse_role(value: object) -> Role:
    """``value`` as a ``Role``.

    Raises:
        AccountError: not one of the role names.
    """
    try:
        return Role(str(value))
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise AccountError(f"unknown role (one of: {names})") from None


def valid_name(name: object) -> bool:
    """Whether ``name`` is a valid account name."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    """``name`` if it is a valid account name (lower-case letters, digits, ``.``, ``_``,
    ``-``; starting with a letter or digit; at most 64 characters).

    Raises:
        AccountError: it is not.
    """
    if not valid_name(name):
        raise AccountError(
            f"an account name is 1..{MAX_NAME_CHARS} of a-z 0-9 . _ - (starting with a-z 0-9)"
        )
    return name
