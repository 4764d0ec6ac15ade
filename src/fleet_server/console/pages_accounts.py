"""Console pages of operator accounts: the accounts page (an accounts admin lists, creates,
disables, enables and re-roles accounts) and "my account" (any account changes its own
password and lists, creates and revokes its own API tokens; a new token's secret is shown on
the answer page once and never again).

The calls are the ones the admin API's account routes make (``fleet_server.admin.accounts``)
on the same ``Accounts`` store, with the same rules: a new token's role is at most the
caller's, it expires within ``MAX_TOKEN_DAYS``; changing one's own password needs the current
one here for every role (a wrong one counts towards the lockout like a failed login). "My
account" acts on the session's own account only.

Owns: reading the forms and rendering. Does not own the session, CSRF, role and audit checks
(``fleet_server.console.web``) nor the rules of accounts (``fleet_server.accounts.store``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fleet_server.accounts.passwords import MAX_PASSWORD_CHARS
from fleet_server.accounts.roles import Role, role_at_most
from fleet_server.accounts.store import MAX_TOKEN_DAYS, Accounts
from fleet_server.accounts.values import check_name, parse_role
from fleet_server.admin.accounts import DEFAULT_TOKEN_DAYS
from fleet_server.console.web import PREFIX, Console, Ctx, WriteResult
from fleet_server.errors import (
    AccountLockedError,
    AdminInputError,
    AuthenticationError,
    ForbiddenError,
)

__all__ = ["ROLE_CHOICES", "AccountPages", "account_body", "token_body"]

ROLE_CHOICES: Final = tuple(str(r) for r in Role)
_LABEL_CHARS: Final = 200


def _field(form: Mapping[str, str], name: str, limit: int) -> str:
    value = form.get(name, "")
    if len(value) > limit:
        raise AdminInputError(f"{name} is longer than {limit} characters")
    return value


def account_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/accounts`` body of the create form (an empty password: none yet).

    Raises:
        AccountError: a malformed name or an unknown role.
        AdminInputError: a field is too long.
    """
    body: dict[str, Any] = {
        "name": check_name(_field(form, "name", 64)),
        "role": str(parse_role(_field(form, "role", 32))),
    }
    password = _field(form, "password", MAX_PASSWORD_CHARS)
    if password:
        body["password"] = password
    return body


def token_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/tokens`` body of the new-token form.

    Raises:
        AccountError: an unknown role.
        AdminInputError: a field is too long or the days are not a whole number in range.
    """
    text = _field(form, "expires_days", 8).strip() or str(DEFAULT_TOKEN_DAYS)
    if not text.isdigit() or not 1 <= int(text) <= MAX_TOKEN_DAYS:
        raise AdminInputError(f"expires_days is a whole number from 1 to {MAX_TOKEN_DAYS}")
    body: dict[str, Any] = {
        "expires_days": int(text),
        "label": _field(form, "label", _LABEL_CHARS),
    }
    role = _field(form, "role", 32)
    if role:
        body["role"] = str(parse_role(role))
    return body


def _name(request: Request) -> str:
    return check_name(str(request.path_params.get("name", ""))[:128])


class AccountPages:
    """The accounts page and "my account", and their writes."""

    def __init__(self, console: Console, accounts: Accounts) -> None:
        """Serve the pages through ``console`` over ``accounts``."""
        self.console = console
        self.accounts = accounts

    # ------------------------------------------------------------------ pages
    async def accounts_page(self, ctx: Ctx) -> Response:
        """Every account with its state, the create form and each row's actions."""
        rows = await run_in_threadpool(self.accounts.list)
        return self.console.render(
            ctx.request, "accounts.html", ctx=ctx, accounts=rows, roles=ROLE_CHOICES
        )

    async def me(self, ctx: Ctx, *, secret: str | None = None, status: int = 200) -> Response:
        """The caller's account, its password form and its API tokens (with a new token's
        ``secret`` when one was just created)."""
        name = ctx.principal.account
        account = await run_in_threadpool(self.accounts.show, name)
        tokens = await run_in_threadpool(self.accounts.list_tokens, name)
        roles = [r for r in ROLE_CHOICES if role_at_most(Role(r), ctx.principal.role)]
        return self.console.render(
            ctx.request,
            "me.html",
            status,
            ctx=ctx,
            account=account,
            tokens=tokens,
            roles=roles,
            secret=secret,
            default_days=DEFAULT_TOKEN_DAYS,
            max_days=MAX_TOKEN_DAYS,
        )

    # ------------------------------------------------------------------ admin writes
    async def create(self, ctx: Ctx) -> WriteResult:
        """Create an account (``POST /v1/accounts``)."""
        body = account_body(ctx.form)
        acc = await run_in_threadpool(
            self.accounts.create, body["name"], Role(body["role"]), body.get("password")
        )
        return WriteResult(acc.to_dict(), redirect=f"{PREFIX}/accounts", status=201)

    async def disable(self, ctx: Ctx) -> WriteResult:
        """Disable an account (``POST /v1/accounts/{name}/disable``)."""
        acc = await run_in_threadpool(self.accounts.disable, _name(ctx.request))
        return WriteResult(acc.to_dict(), redirect=f"{PREFIX}/accounts")

    async def enable(self, ctx: Ctx) -> WriteResult:
        """Enable an account (``POST /v1/accounts/{name}/enable``)."""
        acc = await run_in_threadpool(self.accounts.enable, _name(ctx.request))
        return WriteResult(acc.to_dict(), redirect=f"{PREFIX}/accounts")

    async def set_role(self, ctx: Ctx) -> WriteResult:
        """Change an account's role (``POST /v1/accounts/{name}/role``)."""
        role = parse_role(_field(ctx.form, "role", 32))
        acc = await run_in_threadpool(self.accounts.set_role, _name(ctx.request), role)
        return WriteResult(acc.to_dict(), redirect=f"{PREFIX}/accounts")

    # ------------------------------------------------------------------ own writes
    async def set_password(self, ctx: Ctx) -> WriteResult:
        """Change the caller's own password (``POST /v1/accounts/{name}/password``); the
        session ends with it (the store ends the account's sessions): log in again.

        Raises:
            ForbiddenError: the current password is wrong.
            AccountLockedError: too many wrong passwords.
            AdminInputError: the two new passwords differ.
            PasswordPolicyError: the new password breaks the policy.
        """
        name = ctx.principal.account
        current = _field(ctx.form, "current_password", MAX_PASSWORD_CHARS)
        new = _field(ctx.form, "password", MAX_PASSWORD_CHARS)
        if new != ctx.form.get("confirm", ""):
            raise AdminInputError("the new password and its confirmation differ")
        try:
            await run_in_threadpool(self.accounts.authenticate, name, current)
        except AccountLockedError:
            raise
        except AuthenticationError:
            raise ForbiddenError("the current password is wrong") from None
        acc = await run_in_threadpool(self.accounts.set_password, name, new)
        return WriteResult(acc.to_dict(), redirect=f"{PREFIX}/login")

    async def create_token(self, ctx: Ctx) -> WriteResult:
        """Create an API token of the caller's (``POST /v1/tokens``); the answer page shows
        its secret once (the audited answer holds no secret).

        Raises:
            ForbiddenError: a role above the caller's.
        """
        who = ctx.principal
        body = token_body(ctx.form)
        role = Role(body["role"]) if "role" in body else who.role
        if not role_at_most(role, who.role):
            raise ForbiddenError(f"a {who.role} cannot create a {role} token")
        expires = self.accounts.now() + timedelta(days=body["expires_days"])
        token_id, secret = await run_in_threadpool(
            self.accounts.create_token, who.account, role, expires, body["label"]
        )
        tok = await run_in_threadpool(self.accounts.token, token_id)
        page = await self.me(ctx, secret=secret, status=201)
        return WriteResult(tok.to_dict(), fragment=page, status=201)

    async def revoke_token(self, ctx: Ctx) -> WriteResult:
        """Revoke one of the caller's own tokens (``POST /v1/tokens/{token_id}/revoke``).

        Raises:
            ForbiddenError: the token is another account's.
            UnknownApiTokenError: no such token.
        """
        token_id = str(ctx.request.path_params.get("token_id", ""))[:128]
        tok = await run_in_threadpool(self.accounts.token, token_id)
        if tok.account != ctx.principal.account:
            raise ForbiddenError("this page revokes the caller's own tokens only")
        tok = await run_in_threadpool(self.accounts.revoke_token, token_id)
        return WriteResult(tok.to_dict(), redirect=f"{PREFIX}/me")
