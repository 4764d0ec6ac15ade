"""Password hashing and the password policy: argon2id through argon2-cffi.

Owns: ``Passwords`` (hash, verify, whether a stored hash needs a rehash because the parameters
changed, and a verification against a dummy hash so an unknown account costs as much time as
a known one) and ``check_policy`` (length bounds, no control characters). Pure apart from the
CPU time the hash costs. Does not own where hashes are stored (``fleet_server.accounts.store``).

The default parameters are argon2-cffi's (RFC 9106's second recommendation: argon2id, 3
passes, 64 MiB, 4 lanes). Changing them takes effect at each account's next successful login,
when its hash is replaced (``needs_rehash``).
"""

from __future__ import annotations

import unicodedata
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fleet_server.errors import PasswordPolicyError

__all__ = ["MAX_PASSWORD_CHARS", "MIN_PASSWORD_CHARS", "Passwords", "check_policy"]

#: NIST SP 800-63B asks for at least 8 characters; an operator console asks for more.
MIN_PASSWORD_CHARS: Final = 12
#: A bound so a huge password cannot make hashing a denial of service.
MAX_PASSWORD_CHARS: Final = 256


def check_policy(password: str) -> None:
    """Refuse a password the policy does not allow.

    Raises:
        PasswordPolicyError: fewer than ``MIN_PASSWORD_CHARS`` or more than
            ``MAX_PASSWORD_CHARS`` characters, or a control character (a pasted newline is a
            mistake, not entropy).
    """
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordPolicyError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordPolicyError(f"a password has at most {MAX_PASSWORD_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise PasswordPolicyError("a password must not contain control characters")


class Passwords:
    """argon2id hashing with one set of parameters.

    Args:
        hasher: the argon2-cffi hasher (its parameters); the default is argon2-cffi's.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        """Hash with ``hasher`` (argon2-cffi's defaults when ``None``)."""
        self._hasher = hasher or PasswordHasher()
        # Verified against when the account is unknown, so the answer takes as long.
        self._dummy = self._hasher.hash("not a password of anyone: timing equaliser")

    def hash(self, password: str) -> str:
        """The encoded argon2id hash of ``password`` (salt and parameters included)."""
        return self._hasher.hash(password)

    def verify(self, encoded: str | None, password: str) -> bool:
        """Whether ``password`` matches ``encoded``; with ``encoded`` ``None`` (no such account,
        or no password set) a dummy hash is verified and the answer is ``False``.

        A malformed stored hash answers ``False`` (the account cannot log in until an admin
        sets a new password); it never raises.
        """
        if len(password) > MAX_PASSWORD_CHARS:
            return False  # never hash unbounded input
        try:
            return self._hasher.verify(encoded or self._dummy, password) and encoded is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, encoded: str) -> bool:
        """Whether ``encoded`` was made with other parameters than this hasher's."""
        try:
            return self._hasher.check_needs_rehash(encoded)
        except InvalidHashError:
            return True
