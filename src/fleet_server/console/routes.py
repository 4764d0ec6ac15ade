"""The console's routes under ``/console/`` and the login/logout flow; ``console_routes``
is what ``fleet_server.server`` adds to the admin app.

Pages (GET; a live session with ``read``, the audit log ``audit.read``)::

    /console/                      fleet overview
    /console/devices               ?group=&tag=key=value&state=&version=model[@v]&page=
    /console/devices/{device_id}   one device
    /console/models                versions, provenance, report, history
    /console/models/{name}/accuracy   ?hours=: field accuracy from ground truth
    /console/rollouts              list + create form
    /console/rollouts/{id}         live view (htmx polls it)
    /console/drift                 ?model=&version=&by=&since=&until=&tensor=&feature=
    /console/fallback              cloud fallback
    /console/audit                 ?since=&until=&actor=&action=&object=
    /console/accounts              every account (``accounts.admin``)
    /console/me                    my account: password, my API tokens (``self``)
    /console/login, /console/static/{name}   (no session; any other /console/ path: 404 page)

Writes (POST, a session, its CSRF token and the role the API route needs; audited as it)::

    /console/devices/{device_id}/revoke        POST /v1/devices/{device_id}/revoke
    /console/devices/{device_id}/labels        POST /v1/devices/{device_id}/labels
    /console/devices/{device_id}/commands      POST /v1/devices/{device_id}/commands
                                               (ping, logs, support-bundle; with diagnostics)
    /console/assign                            POST /v1/assign (the models page's form)
    /console/rollouts                          POST /v1/rollouts
    /console/rollouts/{id}/approve|pause|resume|abort   POST /v1/rollouts/{rollout_id}/...
    /console/accounts                          POST /v1/accounts
    /console/accounts/{name}/disable|enable|role   POST /v1/accounts/{name}/...
    /console/me/password                       POST /v1/accounts/{name}/password (own)
    /console/me/tokens                         POST /v1/tokens (own)
    /console/me/tokens/{token_id}/revoke       POST /v1/tokens/{token_id}/revoke (own)
    /console/login, /console/logout            (the session itself)

The account pages and writes are served when the server has an account store.

The session cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, and ``Secure`` when the
request came over TLS; it lives as long as the session (``Session.expires_at``). A failed
login says only that it failed (the account store answers unknown account, wrong password and
disabled account alike) and is logged with the client address; a locked account is told so.

Owns: the above. Does not own the pages (``pages_*``) nor the checks (``web``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from edge_agent.errors import EdgefleetError
from fleet_server.accounts.roles import Permission, Principal
from fleet_server.accounts.sessions import SESSION_COOKIE
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator
from fleet_server.admin.body import read_body
from fleet_server.admin.rollouts import COMMANDS
from fleet_server.console.pages_accounts import AccountPages, account_body, token_body
from fleet_server.console.pages_assign import Assignments, assign_body
from fleet_server.console.pages_device_ops import DeviceOps, command_body, labels_body
from fleet_server.console.pages_fleet import FleetPages
from fleet_server.console.pages_ops import OpsPages
from fleet_server.console.pages_release import ReleasePages, create_body
from fleet_server.console.web import (
    MAX_FORM_BYTES,
    PREFIX,
    Console,
    Ctx,
    form_fields,
    same_origin,
    static_asset,
)
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.drift.service import DriftService
from fleet_server.errors import (
    ERRORS,
    AccountLockedError,
    AuthenticationError,
    RegistryUnavailableError,
)
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.audit import Actor
from fleet_server.service import FleetService

__all__ = ["ConsoleDeps", "console_routes"]

log = logging.getLogger(__name__)
_MAX_NAME: Final = 64
_MAX_PASSWORD: Final = 1024


@dataclass(frozen=True)
class ConsoleDeps:
    """The service objects the console reads and writes through (the admin API's own)."""

    service: FleetService
    runner: RolloutRunner
    drift: DriftService
    auth: Authenticator
    auditor: Auditor | None
    fallback_stats: Callable[[], Mapping[str, Any]] | None = None
    diagnostics: Diagnostics | None = None


def _path_only(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    return {n: str(request.path_params.get(n, ""))[:128] for n in names}


def _create_described(request: Request, form: Mapping[str, str]) -> tuple[dict[str, str], Any]:
    try:
        return {}, create_body(form)
    except EdgefleetError:  # still recorded (as the API records a bad body): the raw fields
        return {}, {k: v for k, v in form.items() if k != "csrf_token"}


def _described(
    build: Callable[[Mapping[str, str]], dict[str, Any]], path: tuple[str, ...] = ()
) -> Callable[[Request, Mapping[str, str]], tuple[dict[str, str], Any]]:
    """The audit's view of a form write: its path values and the API body it stands for
    (a malformed form: its raw fields, as the API records a bad body)."""

    def describe(request: Request, form: Mapping[str, str]) -> tuple[dict[str, str], Any]:
        values = _path_only(request, path)
        try:
            return values, build(form)
        except EdgefleetError:
            return values, {k: v for k, v in form.items() if k != "csrf_token"}

    return describe


def _safe_next(value: str | None) -> str:
    """A post-login target inside the console only (no open redirect)."""
    if value and value.startswith(f"{PREFIX}/") and "//" not in value and "\\" not in value:
        return value[:512]
    return f"{PREFIX}/"


def console_routes(deps: ConsoleDeps) -> list[Route]:
    """The console's routes over ``deps`` (see the module docstring)."""
    console = Console(deps.auth, deps.auditor)
    fleet = FleetPages(console, deps.service, deps.runner)
    release = ReleasePages(console, deps.service, deps.runner, deps.drift.now)
    ops = OpsPages(console, deps.service, deps.drift, deps.runner.registry, deps.fallback_stats)
    device_ops = DeviceOps(deps.runner.registry, deps.diagnostics)
    assignments = Assignments(deps.service)

    async def device_page(ctx: Ctx) -> Response:
        device_id = str(ctx.request.path_params.get("device_id", ""))
        return await fleet.device(ctx, await device_ops.view(device_id))

    async def _audit(
        actor: Actor, client: str, what: str, account: str, status: int, code: str = ""
    ) -> None:
        if deps.auditor is not None:
            action = f"POST {PREFIX}/{what}"
            obj = f"account:{account[:_MAX_NAME]}"
            await deps.auditor.event(actor, client, action, obj, status, code)

    async def _account_exists(name: str) -> bool:
        accounts = deps.auth.accounts
        if accounts is None:
            return False
        try:
            await run_in_threadpool(accounts.show, name)
        except EdgefleetError:  # unknown (or a name no account can have), or the DB failed
            return False
        return True

    async def login_form(request: Request) -> Response:
        found = await console.caller(request)
        if found is not None:
            return console.headers(RedirectResponse(f"{PREFIX}/", status_code=303))
        nxt = _safe_next(request.query_params.get("next"))
        return console.render(request, "login.html", ctx=None, next=nxt, message=None)

    async def login(request: Request) -> Response:
        accounts = deps.auth.accounts
        if not same_origin(request):
            return console.error(None, request, 403, "cross-site login refused")
        try:
            form = form_fields(await read_body(request, MAX_FORM_BYTES))
        except EdgefleetError as exc:
            return console.error(None, request, ERRORS.admin_status(exc), str(exc))
        name = form.get("name", "")[:_MAX_NAME]
        password = form.get("password", "")[:_MAX_PASSWORD]
        nxt = _safe_next(form.get("next"))
        client = _client(request)
        message = "login failed: wrong account name or password"
        status = 401
        if accounts is not None:
            try:
                principal = await run_in_threadpool(accounts.authenticate, name, password)
                session = await run_in_threadpool(accounts.create_session, principal, client)
            except AccountLockedError as exc:
                # Not audited per attempt: a locked account refuses without counting, so
                # each attempt would be a row anyone could add; the failure that locked it is.
                message, status = str(exc), 429
                log.warning("console: login to locked account %r from %s", name[:64], client)
            except AuthenticationError as exc:
                log.warning("console: failed login for %r from %s", name[:64], client)
                if await _account_exists(name):
                    try:
                        await _audit(
                            Actor("unauthenticated", ""), client, "login", name, 401, exc.code
                        )
                    except RegistryUnavailableError:  # the login failed either way
                        log.exception("audit log: failed console login of %r not recorded", name)
            except RegistryUnavailableError as exc:
                return console.error(None, request, 503, str(exc))
            else:
                try:
                    await _audit(Actor("session", principal.account), client, "login", name, 303)
                except RegistryUnavailableError as exc:
                    # No login without its entry (as no admin action runs without one).
                    # Its cookie was never sent, so a session left open cannot be used.
                    with contextlib.suppress(RegistryUnavailableError):
                        await run_in_threadpool(accounts.end_session, session.id)
                    return console.error(None, request, 503, str(exc))
                response = console.headers(RedirectResponse(nxt, status_code=303))
                max_age = accounts.policy.session_absolute_seconds
                response.set_cookie(
                    SESSION_COOKIE,
                    session.cookie,
                    max_age=max_age,
                    path="/",
                    secure=request.url.scheme == "https",
                    httponly=True,
                    samesite="strict",
                )
                log.info("console: %s logged in from %s", principal.account, client)
                return response
        return console.render(request, "login.html", status, ctx=None, next=nxt, message=message)

    async def logout(request: Request) -> Response:
        # A cross-site POST carries no SameSite=Strict cookie: nothing to end then.
        found = await console.caller(request) if same_origin(request) else None
        accounts = deps.auth.accounts
        if found is not None and accounts is not None:
            await run_in_threadpool(accounts.end_session, found[0].credential)
            account = found[0].account
            try:
                await _audit(Actor("session", account), _client(request), "logout", account, 303)
            except RegistryUnavailableError:  # the session is over either way
                log.exception("audit log: console logout of %r not recorded", account)
        response = console.headers(RedirectResponse(f"{PREFIX}/login", status_code=303))
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def static(request: Request) -> Response:
        found = static_asset(str(request.path_params.get("name", "")))
        if found is None:
            return console.headers(Response("not found", status_code=404))
        data, media = found
        response = Response(data, media_type=media)
        response.headers["Cache-Control"] = "public, max-age=3600"
        return console.headers(response)

    async def root(request: Request) -> Response:
        return console.headers(RedirectResponse(f"{PREFIX}/", status_code=307))

    async def not_found(request: Request) -> Response:
        found = await console.caller(request)
        ctx = None if found is None else Ctx(request, found[0], found[1], {})
        return console.error(ctx, request, 404, "no such page")

    def rollout_command(c: str) -> Route:
        return Route(
            f"{PREFIX}/rollouts/{{rollout_id}}/{c}",
            console.write(
                f"POST /v1/rollouts/{{rollout_id}}/{c}",
                lambda req, form: (_path_only(req, ("rollout_id",)), {}),
                release.command(c),
            ),
            methods=["POST"],
        )

    return [
        *_account_routes(console, deps),
        Route(PREFIX, root, methods=["GET"]),
        Route(f"{PREFIX}/login", login_form, methods=["GET"]),
        Route(f"{PREFIX}/login", login, methods=["POST"]),
        Route(f"{PREFIX}/logout", logout, methods=["POST"]),
        Route(f"{PREFIX}/static/{{name}}", static, methods=["GET"]),
        Route(f"{PREFIX}/", console.page(fleet.overview), methods=["GET"]),
        Route(f"{PREFIX}/devices", console.page(fleet.devices), methods=["GET"]),
        Route(f"{PREFIX}/devices/{{device_id}}", console.page(device_page), methods=["GET"]),
        Route(
            f"{PREFIX}/devices/{{device_id}}/labels",
            console.write(
                "POST /v1/devices/{device_id}/labels",
                _described(labels_body, ("device_id",)),
                device_ops.set_labels,
            ),
            methods=["POST"],
        ),
        Route(
            f"{PREFIX}/devices/{{device_id}}/commands",
            console.write(
                "POST /v1/devices/{device_id}/commands",
                _described(command_body, ("device_id",)),
                device_ops.command,
            ),
            methods=["POST"],
        ),
        Route(
            f"{PREFIX}/devices/{{device_id}}/revoke",
            console.write(
                "POST /v1/devices/{device_id}/revoke",
                lambda req, form: (_path_only(req, ("device_id",)), {}),
                fleet.revoke,
            ),
            methods=["POST"],
        ),
        Route(f"{PREFIX}/models", console.page(release.models), methods=["GET"]),
        Route(
            f"{PREFIX}/assign",
            console.write("POST /v1/assign", _described(assign_body), assignments.assign),
            methods=["POST"],
        ),
        Route(
            # ``path``: a model name may hold "/" (a label: [A-Za-z0-9_.:/-]).
            f"{PREFIX}/models/{{name:path}}/accuracy",
            console.page(release.accuracy),
            methods=["GET"],
        ),
        Route(f"{PREFIX}/rollouts", console.page(release.rollouts), methods=["GET"]),
        Route(
            f"{PREFIX}/rollouts",
            console.write("POST /v1/rollouts", _create_described, release.create),
            methods=["POST"],
        ),
        Route(f"{PREFIX}/rollouts/{{rollout_id}}", console.page(release.rollout), methods=["GET"]),
        *[rollout_command(c) for c in COMMANDS],
        Route(f"{PREFIX}/drift", console.page(ops.drift_page), methods=["GET"]),
        Route(f"{PREFIX}/fallback", console.page(ops.fallback), methods=["GET"]),
        Route(f"{PREFIX}/audit", console.page(ops.audit, Permission.AUDIT_READ), methods=["GET"]),
        Route(f"{PREFIX}/{{rest:path}}", not_found, methods=["GET"]),  # last: any other page
    ]


def _account_routes(console: Console, deps: ConsoleDeps) -> list[Route]:
    """The accounts page and "my account" with their writes (none without an account store)."""
    accounts = deps.auth.accounts
    if accounts is None:
        return []
    pages = AccountPages(console, accounts)

    def own_password(request: Request, form: Mapping[str, str]) -> tuple[dict[str, str], Any]:
        # The API request is on the caller's own name (``Console.write`` sets the caller in
        # the request's state, as the admin guard does).
        who = getattr(request.state, "principal", None)
        name = who.account if isinstance(who, Principal) else ""
        body = {k: form.get(k, "") for k in ("password", "current_password")}
        return {"name": name}, body

    def role_body(form: Mapping[str, str]) -> dict[str, Any]:
        return {"role": form.get("role", "")[:32]}

    def account_write(what: str) -> Route:
        handler = {"disable": pages.disable, "enable": pages.enable, "role": pages.set_role}[what]
        build = role_body if what == "role" else (lambda f: {})
        return Route(
            f"{PREFIX}/accounts/{{name}}/{what}",
            console.write(
                f"POST /v1/accounts/{{name}}/{what}",
                _described(build, ("name",)),
                handler,
            ),
            methods=["POST"],
        )

    admin = Permission.ACCOUNTS_ADMIN
    return [
        Route(f"{PREFIX}/accounts", console.page(pages.accounts_page, admin), methods=["GET"]),
        Route(
            f"{PREFIX}/accounts",
            console.write("POST /v1/accounts", _described(account_body), pages.create),
            methods=["POST"],
        ),
        *[account_write(w) for w in ("disable", "enable", "role")],
        Route(f"{PREFIX}/me", console.page(pages.me, Permission.SELF), methods=["GET"]),
        Route(
            f"{PREFIX}/me/password",
            console.write("POST /v1/accounts/{name}/password", own_password, pages.set_password),
            methods=["POST"],
        ),
        Route(
            f"{PREFIX}/me/tokens",
            console.write("POST /v1/tokens", _described(token_body), pages.create_token),
            methods=["POST"],
        ),
        Route(
            f"{PREFIX}/me/tokens/{{token_id}}/revoke",
            console.write(
                "POST /v1/tokens/{token_id}/revoke",
                _described(lambda f: {}, ("token_id",)),
                pages.revoke_token,
            ),
            methods=["POST"],
        ),
    ]


def _client(request: Request) -> str:
    return request.client.host if request.client else ""
