"""Who is calling the admin API (or the console), and may they do what they ask.

Owns: ``Authenticator``: a request's ``Principal`` from ``Authorization: Bearer <token>`` (a
per-account API token, or the configured bootstrap token) or from the console's session
cookie; the CSRF check of cookie-authenticated writes; the role check of an action
(``authorize``: the route table of ``fleet_server.accounts.roles``, an unlisted action is
refused); the audit ``Actor`` of a principal. The admin guard (``fleet_server.admin.api``) and
the console use the same instance. Does not own: accounts, tokens and sessions
(``fleet_server.accounts.store``) nor HTTP answers (the guard turns the errors into them).

The bootstrap token is the ``[api] token``/``token_file`` of the configuration. It
authenticates as the built-in ``Principal("admin", Role.ADMIN, "bootstrap-token",
"bootstrap")`` (audited as ``bootstrap-token:admin``): the way to create the first named
accounts on a fresh install. Set ``[api] bootstrap_token = false`` once they exist and it is
refused like any unknown token.
"""

from __future__ import annotations

import hmac
from typing import Final
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from fleet_server.accounts.roles import Permission, Principal, Role, permission_for
from fleet_server.accounts.sessions import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, csrf_matches
from fleet_server.accounts.store import Accounts
from fleet_server.errors import CsrfError, ForbiddenError
from fleet_server.registry.audit import Actor

__all__ = ["BOOTSTRAP_PRINCIPAL", "SAFE_METHODS", "Authenticator", "actor_of"]

#: Methods that change nothing (no CSRF token needed, not audited).
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: The caller holding the configured bootstrap token.
BOOTSTRAP_PRINCIPAL: Final = Principal("admin", Role.ADMIN, "bootstrap-token", "bootstrap")
_MAX_HEADER = 512
_MAX_FORM = 64 * 1024


def actor_of(principal: Principal) -> Actor:
    """The audit log's actor of ``principal``: ``<via>:<account>`` (``token:alice``,
    ``session:alice``, ``bootstrap-token:admin``)."""
    return Actor(principal.via, principal.account)


class Authenticator:
    """Resolves and checks the callers of the admin API and the console.

    Args:
        accounts: the account store (``None``: only the bootstrap token authenticates).
        bootstrap_token: the configured shared token (``None``: disabled).
    """

    def __init__(self, accounts: Accounts | None, bootstrap_token: str | None) -> None:
        """Authenticate against ``accounts`` and ``bootstrap_token``.

        Raises:
            ValueError: ``bootstrap_token`` is shorter than 16 characters.
        """
        if bootstrap_token is not None and len(bootstrap_token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self._accounts = accounts
        self._bootstrap = None if bootstrap_token is None else bootstrap_token.encode()

    @property
    def accounts(self) -> Accounts | None:
        """The account store (the console's login uses it)."""
        return self._accounts

    def bearer(self, value: str) -> Principal | None:
        """The principal of an ``Authorization`` header value, or ``None``.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        if len(value) > _MAX_HEADER or not value.startswith("Bearer "):
            return None
        token = value[len("Bearer ") :]
        if self._bootstrap is not None and hmac.compare_digest(token.encode(), self._bootstrap):
            return BOOTSTRAP_PRINCIPAL
        if self._accounts is None:
            return None
        return self._accounts.resolve_token(token)

    def session(self, cookie: str) -> tuple[Principal, str] | None:
        """``(principal, csrf_token)`` of a session cookie value, or ``None``.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        if self._accounts is None or not cookie or len(cookie) > _MAX_HEADER:
            return None
        return self._accounts.resolve_session(cookie)

    async def principal(self, request: Request) -> Principal | None:
        """The caller of ``request``: by its bearer token when it sends ``Authorization``
        (never falling back to the cookie then), else by its session cookie, which for a
        method that is not safe must come with the session's CSRF token in ``CSRF_HEADER``
        (or, for an ``application/x-www-form-urlencoded`` form of at most 64 KiB, its
        ``CSRF_FIELD`` field: the body is read for it and stays readable by the handler through
        ``request.body()``). ``None``: not authenticated.

        Raises:
            CsrfError: a cookie-authenticated write without the session's CSRF token.
            RegistryUnavailableError: the database failed.
        """
        header = request.headers.get("authorization")
        if header is not None:
            return await run_in_threadpool(self.bearer, header)
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        found = await run_in_threadpool(self.session, cookie)
        if found is None:
            return None
        who, csrf = found
        if request.method not in SAFE_METHODS:
            given = request.headers.get(CSRF_HEADER)
            if given is None:
                given = await _form_field(request, CSRF_FIELD)
            if not csrf_matches(given, csrf):
                raise CsrfError("the session's CSRF token is missing or wrong")
        return who

    @staticmethod
    def authorize(principal: Principal, action: str) -> Permission:
        """The permission ``action`` needs, if ``principal`` holds it.

        Raises:
            ForbiddenError: the role does not hold it, or ``action`` is in no table.
        """
        needed = permission_for(action)
        if needed is None:
            raise ForbiddenError(f"{action} is not open to any role")
        if not principal.allows(needed):
            raise ForbiddenError(f"role {principal.role} may not {action} (needs {needed})")
        return needed


async def _form_field(request: Request, name: str) -> str | None:
    """The value of ``name`` in a small urlencoded form body, else ``None``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if ctype != "application/x-www-form-urlencoded" or not declared.isdigit():
        return None
    if len(declared) > 6 or int(declared) > _MAX_FORM:
        return None
    raw = await request.body()
    if len(raw) > _MAX_FORM:
        return None
    try:
        values = parse_qs(raw.decode("ascii"), max_num_fields=256).get(name, [])
    except (UnicodeDecodeError, ValueError):
        return None
    return values[0] if len(values) == 1 else None
