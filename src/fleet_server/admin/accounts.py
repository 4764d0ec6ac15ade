"""Admin API routes of operator accounts and their API tokens (mounted next to
``fleet_server.admin.api``'s, behind its guard: every write here is audited, with password and
token values redacted by the auditor and never in a response it records).

Routes (v1); the permission each needs is in ``fleet_server.accounts.roles``::

    GET  /v1/whoami                           {"account", "role", "via", "credential",
                                               "permissions"}
    GET  /v1/accounts                         {"accounts": [account]}            accounts.admin
    POST /v1/accounts  {"name","role","password"?}  -> 201 account          accounts.admin
    GET  /v1/accounts/{name}                  account                            accounts.admin
    POST /v1/accounts/{name}/disable|enable   account                            accounts.admin
    POST /v1/accounts/{name}/role  {"role"}   account                            accounts.admin
    POST /v1/accounts/{name}/password  {"password", "current_password"?}      self
    GET  /v1/tokens[?account=]                {"tokens": [token]}                self
    POST /v1/tokens  {"role"?, "expires_days"?, "label"?, "account"?}
                                              -> 201 {"id", "token", ...}        self
    POST /v1/tokens/{token_id}/revoke         token                              self

``self`` routes act on the caller's own account; on another account they need
``accounts.admin``. Changing one's own password needs the current one (wrong: 403, and
counted towards the lockout like a failed login). A new token's role is
at most the caller's (a viewer token cannot mint an admin one) and its account's (by default:
the caller's own role for its own token, the account's role for another's); it expires
after ``expires_days`` (default 90, at most 732). Its secret is in the 201 answer only.

Owns: HTTP and JSON shapes, and the "own or admin" rule. The rules of accounts and tokens are
``fleet_server.accounts.store``'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.accounts.passwords import MAX_PASSWORD_CHARS
from fleet_server.accounts.roles import ROLE_PERMISSIONS, Permission, Principal, role_at_most
from fleet_server.accounts.store import MAX_TOKEN_DAYS, Accounts
from fleet_server.accounts.values import check_name, parse_role
from fleet_server.admin.body import json_object, query_text, read_body, req_field
from fleet_server.errors import AccountLockedError, AuthenticationError, ForbiddenError

__all__ = ["DEFAULT_TOKEN_DAYS", "account_routes"]

Handler = Callable[[Request], Awaitable[Response]]
DEFAULT_TOKEN_DAYS: Final = 90
_MAX_BODY: Final = 16 * 1024


def _principal(request: Request) -> Principal:
    who = getattr(request.state, "principal", None)
    if not isinstance(who, Principal):  # the guard always sets it: a wiring bug otherwise
        raise ForbiddenError("no authenticated caller")
    return who


def _own_or_admin(who: Principal, account: str) -> None:
    """Refuse acting on another account without ``accounts.admin``.

    Raises:
        ForbiddenError: ``account`` is not the caller's and the caller is no accounts admin.
    """
    if account != who.account and not who.allows(Permission.ACCOUNTS_ADMIN):
        raise ForbiddenError("only an accounts admin acts on another account")


def account_routes(accounts: Accounts, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The account and token routes over ``accounts``, each wrapped by ``guarded``."""

    async def body(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, _MAX_BODY))

    def path_name(request: Request) -> str:
        return check_name(str(request.path_params["name"]))

    async def whoami(request: Request) -> Response:
        who = _principal(request)
        return JSONResponse(
            {
                "account": who.account,
                "role": str(who.role),
                "via": who.via,
                "credential": who.credential,
                "permissions": sorted(str(p) for p in ROLE_PERMISSIONS[who.role]),
            }
        )

    async def list_accounts(request: Request) -> Response:
        rows = await run_in_threadpool(accounts.list)
        return JSONResponse({"accounts": [a.to_dict() for a in rows]})

    async def create(request: Request) -> Response:
        data = await body(request)
        name = check_name(req_field(data, "name", str, limit=64))
        role = parse_role(req_field(data, "role", str, limit=32))
        password = req_field(data, "password", str, None, limit=MAX_PASSWORD_CHARS)
        acc = await run_in_threadpool(accounts.create, name, role, password)
        return JSONResponse(acc.to_dict(), status_code=201)

    async def show(request: Request) -> Response:
        acc = await run_in_threadpool(accounts.show, path_name(request))
        return JSONResponse(acc.to_dict())

    async def disable(request: Request) -> Response:
        acc = await run_in_threadpool(accounts.disable, path_name(request))
        return JSONResponse(acc.to_dict())

    async def enable(request: Request) -> Response:
        acc = await run_in_threadpool(accounts.enable, path_name(request))
        return JSONResponse(acc.to_dict())

    async def set_role(request: Request) -> Response:
        role = parse_role(req_field(await body(request), "role", str, limit=32))
        acc = await run_in_threadpool(accounts.set_role, path_name(request), role)
        return JSONResponse(acc.to_dict())

    async def set_password(request: Request) -> Response:
        who, name = _principal(request), path_name(request)
        data = await body(request)
        password = req_field(data, "password", str, limit=MAX_PASSWORD_CHARS)
        if not who.allows(Permission.ACCOUNTS_ADMIN):
            _own_or_admin(who, name)
            current = req_field(data, "current_password", str, limit=MAX_PASSWORD_CHARS)
            # A wrong current password counts towards the lockout like a failed login; it is
            # a 403 here, not a 401: the caller's own credential was accepted.
            try:
                await run_in_threadpool(accounts.authenticate, name, current)
            except AccountLockedError:
                raise
            except AuthenticationError:
                raise ForbiddenError("the current password is wrong") from None
        acc = await run_in_threadpool(accounts.set_password, name, password)
        return JSONResponse(acc.to_dict())

    async def list_tokens(request: Request) -> Response:
        who = _principal(request)
        account = query_text(request.query_params, "account", limit=64) or who.account
        _own_or_admin(who, account)
        rows = await run_in_threadpool(accounts.list_tokens, account)
        return JSONResponse({"tokens": [t.to_dict() for t in rows]})

    async def create_token(request: Request) -> Response:
        who = _principal(request)
        data = await body(request)
        account = check_name(req_field(data, "account", str, who.account, limit=64))
        _own_or_admin(who, account)
        if "role" in data:
            role = parse_role(req_field(data, "role", str, limit=32))
        elif account == who.account:
            role = who.role
        else:  # another account's token: that account's role by default
            role = (await run_in_threadpool(accounts.show, account)).role
        if not role_at_most(role, who.role):
            raise ForbiddenError(f"a {who.role} cannot create a {role} token")
        days = req_field(data, "expires_days", int, DEFAULT_TOKEN_DAYS, lo=1, hi=MAX_TOKEN_DAYS)
        label = req_field(data, "label", str, "", limit=200)
        now = accounts.now()
        token_id, secret = await run_in_threadpool(
            accounts.create_token, account, role, now + timedelta(days=days), label
        )
        tok = await run_in_threadpool(accounts.token, token_id)
        return JSONResponse({**tok.to_dict(), "token": secret}, status_code=201)

    async def revoke_token(request: Request) -> Response:
        who = _principal(request)
        token_id = str(request.path_params["token_id"])
        tok = await run_in_threadpool(accounts.token, token_id)
        _own_or_admin(who, tok.account)
        tok = await run_in_threadpool(accounts.revoke_token, token_id)
        return JSONResponse(tok.to_dict())

    return [
        Route("/v1/whoami", guarded(whoami), methods=["GET"]),
        Route("/v1/accounts", guarded(list_accounts), methods=["GET"]),
        Route("/v1/accounts", guarded(create), methods=["POST"]),
        Route("/v1/accounts/{name}", guarded(show), methods=["GET"]),
        Route("/v1/accounts/{name}/disable", guarded(disable), methods=["POST"]),
        Route("/v1/accounts/{name}/enable", guarded(enable), methods=["POST"]),
        Route("/v1/accounts/{name}/role", guarded(set_role), methods=["POST"]),
        Route("/v1/accounts/{name}/password", guarded(set_password), methods=["POST"]),
        Route("/v1/tokens", guarded(list_tokens), methods=["GET"]),
        Route("/v1/tokens", guarded(create_token), methods=["POST"]),
        Route("/v1/tokens/{token_id}/revoke", guarded(revoke_token), methods=["POST"]),
    ]
