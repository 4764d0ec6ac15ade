"""The names and pure checks of console sessions, CSRF tokens and credential values.

Owns: the names the console and the admin guard share (``SESSION_COOKIE``, ``CSRF_HEADER``,
``CSRF_FIELD``), the ``Session`` a login returns, how a credential value is made and parsed
(``new_credential``, ``split_credential``: ``<id><sep><secret>``), its stored digest
(``digest``), a session's CSRF token (``csrf_of``: derived from the session's secret, never
stored) and the constant-time CSRF comparison (``csrf_matches``). Pure: no I/O. Does not own
the session rows nor their timeouts (``fleet_server.accounts.store``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Final

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Session",
    "csrf_matches",
    "csrf_of",
    "digest",
    "new_credential",
    "split_credential",
    "valid_id",
]

#: The console's session cookie (``<id>.<secret>``; set it Secure, HttpOnly, SameSite=Strict).
SESSION_COOKIE: Final = "edgefleet_session"
#: The header a cookie-authenticated write carries its CSRF token in ...
CSRF_HEADER: Final = "X-CSRF-Token"
#: ... or the form field (an HTML form cannot set headers).
CSRF_FIELD: Final = "csrf_token"

_ID = re.compile(r"[0-9a-f]{16}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_VALUE = 128
_MAX_CSRF = 256


@dataclass(frozen=True)
class Session:
    """A new console session: ``cookie`` is the value of ``SESSION_COOKIE`` (a secret: set it
    once, never log it), ``csrf_token`` goes into every form and the ``CSRF_HEADER``."""

    id: str
    csrf_token: str
    expires_at: datetime
    cookie: str


def new_credential() -> tuple[str, str]:
    """A fresh ``(id, secret)``: 8 random bytes as hex (public), 32 as URL-safe base64."""
    return secrets.token_hex(8), secrets.token_urlsafe(32)


def valid_id(value: str) -> bool:
    """Whether ``value`` has the shape of a token or session id."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def split_credential(value: str, sep: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed ``<id><sep><secret>``, else ``None`` (never raises)."""
    if not isinstance(value, str) or len(value) > _MAX_VALUE:
        return None
    ident, _, secret = value.partition(sep)
    if _ID.fullmatch(ident) is None or _SECRET.fullmatch(secret) is None:
        return None
    return ident, secret


def digest(secret: str) -> str:
    """The stored form of a random secret: its SHA-256, hex (a slow hash is for passwords)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_of(secret: str) -> str:
    """The CSRF token of the session whose secret is ``secret`` (HMAC-SHA256, hex)."""
    return hmac.new(secret.encode(), b"edgefleet csrf v1", hashlib.sha256).hexdigest()


def csrf_matches(given: str | None, expected: str) -> bool:
    """Whether the CSRF token a request carried is the session's (constant time; a missing
    or oversized value never matches)."""
    if not given or len(given) > _MAX_CSRF:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())
