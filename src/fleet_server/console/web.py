"""The console's HTTP plumbing: templates, security headers, sessions, CSRF, roles, audit.

Every console answer carries the security headers (``SECURITY_HEADERS``: a
Content-Security-Policy that allows scripts, styles, images and fetches from the console's own
origin only, no inline script or style, no framing, no plugins; ``X-Frame-Options: DENY``;
``Referrer-Policy: same-origin``; ``X-Content-Type-Options: nosniff``; no caching of pages).

A page (``Console.page``) needs a live session (the ``SESSION_COOKIE`` set at login; without
one a browser is sent to the login page) and the ``read`` permission. A write
(``Console.write``) is a POST whose form (capped at ``MAX_FORM_BYTES``) carries the session's
CSRF token in ``CSRF_FIELD``, or htmx's ``CSRF_HEADER``; it names the admin API action it is
(``"POST /v1/rollouts/{rollout_id}/abort"``) and is allowed exactly when the API route is (the
same ``Authenticator``: one role table). It is recorded by the same ``Auditor`` as the API's
requests, as the API request it stands for (the JSON body the API route would take, the
action's path values, ``via=console`` in the query), with the session's account as the actor:
the attempt before the service is called (no entry, no action: 503), the outcome after. A
write the role does not allow is answered 403 and recorded (attempt and outcome 403
``forbidden``), as the API records it; a missing or wrong CSRF token is answered 403 and not
recorded (logged), as the API counts it. A write's request carries its caller in
``request.state.principal``, as the admin guard's requests do.

Owns: the above. Does not own: accounts, sessions and the role table
(``fleet_server.accounts``, ``fleet_server.admin.auth``), nor the pages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Message

from edge_agent.errors import EdgefleetError
from fleet_server.accounts.roles import Permission, Principal
from fleet_server.accounts.sessions import SESSION_COOKIE
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator, actor_of
from fleet_server.admin.body import public_message, read_body
from fleet_server.errors import (
    ADMIN_INTERNAL_STATUS,
    ERRORS,
    AdminInputError,
    CsrfError,
    ForbiddenError,
)

__all__ = [
    "MAX_FORM_BYTES",
    "PREFIX",
    "SECURITY_HEADERS",
    "Console",
    "Ctx",
    "WriteResult",
    "form_fields",
    "same_origin",
    "static_asset",
]

log = logging.getLogger(__name__)

PREFIX: Final = "/console"
MAX_FORM_BYTES: Final = 64 * 1024
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_STATIC: Final = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "publish.js": "text/javascript; charset=utf-8",
}


def static_asset(name: str) -> tuple[bytes, str] | None:
    """A shipped asset's bytes and media type (``None``: not one of ours)."""
    media = _STATIC.get(name)
    if media is None:
        return None
    data = resources.files("fleet_server.console").joinpath("static", name).read_bytes()
    return data, media


def _headers(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


@dataclass(frozen=True)
class Ctx:
    """A console request with its caller: what a page or write handler gets."""

    request: Request
    principal: Principal
    csrf: str
    form: Mapping[str, str]

    def can(self, action: str) -> bool:
        """Whether the caller may do the admin API ``action`` (buttons are shown by this)."""
        try:
            Authenticator.authorize(self.principal, action)
        except ForbiddenError:
            return False
        return True


@dataclass(frozen=True)
class WriteResult:
    """What a write did: the API's JSON answer (audited) and where the browser goes next
    (or a fragment for htmx)."""

    result: Mapping[str, Any]
    redirect: str | None = None
    fragment: Response | None = None
    status: int = 200


PageHandler = Callable[[Ctx], Awaitable[Response]]
WriteHandler = Callable[[Ctx], Awaitable[WriteResult]]
#: ``(path values, JSON body)`` of the API request a console write stands for.
Describe = Callable[[Request, Mapping[str, str]], tuple[dict[str, str], dict[str, Any]]]


def _replay(request: Request, raw: bytes, scope: dict[str, Any] | None = None) -> Request:
    """A request over ``scope`` (default: ``request``'s) whose body is ``raw``."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request(scope or request.scope, receive)


class Console:
    """Renders templates and wraps handlers with the session, CSRF, role and audit checks."""

    def __init__(self, auth: Authenticator, auditor: Auditor | None) -> None:
        """Authenticate with ``auth`` (its accounts log in) and record writes in ``auditor``."""
        self.auth = auth
        self.auditor = auditor
        self.env = Environment(
            loader=PackageLoader("fleet_server.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["pct"] = _pct
        self.env.filters["num"] = _num

    # ------------------------------------------------------------------ rendering
    def render(
        self, request: Request, template: str, http_status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        """``template`` rendered with ``ctx`` (plus ``prefix`` and ``path``), headers set."""
        html = self.env.get_template(template).render(prefix=PREFIX, path=request.url.path, **ctx)
        return _headers(HTMLResponse(html, status_code=http_status))  # type: ignore[return-value]

    def error(self, ctx: Ctx | None, request: Request, status: int, message: str) -> Response:
        """An error page (or, for htmx, the message as a fragment) with ``status``."""
        text = public_message(message)[:500]
        if request.headers.get("hx-request") == "true":
            return self.render(request, "_flash.html", status, kind="error", message=text)
        return self.render(request, "error.html", status, ctx=ctx, status=status, message=text)

    def headers(self, response: Response) -> Response:
        """``response`` with the security headers."""
        return _headers(response)

    # ------------------------------------------------------------------ sessions
    async def caller(self, request: Request) -> tuple[Principal, str] | None:
        """``(principal, csrf)`` of the request's session cookie, or ``None``.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if not cookie:
            return None
        return await run_in_threadpool(self.auth.session, cookie)

    def _to_login(self, request: Request) -> Response:
        target = f"{PREFIX}/login?next={quote(request.url.path, safe='/')}"
        if request.headers.get("hx-request") == "true":
            return _headers(Response(status_code=401, headers={"HX-Redirect": target}))
        return _headers(RedirectResponse(target, status_code=303))

    def page(
        self, handler: PageHandler, permission: Permission = Permission.READ
    ) -> Callable[[Request], Awaitable[Response]]:
        """A GET page: a live session holding ``permission``; our errors as error pages."""

        async def run(request: Request) -> Response:
            ctx: Ctx | None = None
            try:
                found = await self.caller(request)
                if found is None:
                    return self._to_login(request)
                principal, csrf = found
                ctx = Ctx(request, principal, csrf, {})
                if not principal.allows(permission):
                    raise ForbiddenError(f"role {principal.role} may not see this page")
                return _headers(await handler(ctx))
            except EdgefleetError as exc:
                return self.error(ctx, request, ERRORS.admin_status(exc), str(exc))
            except Exception:
                log.exception("console %s failed", request.url.path[:200])
                return self.error(ctx, request, ADMIN_INTERNAL_STATUS, "internal error")

        return run

    def write(
        self, action: str, describe: Describe, handler: WriteHandler
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST that does the admin API ``action``: session, CSRF token, role, then the
        audited ``handler``. ``describe`` gives the API request it stands for (audit)."""

        async def run(request: Request) -> Response:
            ctx: Ctx | None = None
            try:
                raw = await read_body(request, MAX_FORM_BYTES)
                request = _replay(request, raw)
                if request.cookies.get(SESSION_COOKIE) is None:
                    return self._to_login(request)
                principal = await self.auth.principal(request)  # checks the CSRF token
                if principal is None or principal.via != "session":
                    return self._to_login(request)
                found = await self.caller(request)
                if found is None:
                    return self._to_login(request)
                form = form_fields(raw)
                request.state.principal = principal  # as the admin guard sets it
                ctx = Ctx(request, principal, found[1], form)
                try:
                    self.auth.authorize(principal, action)
                except ForbiddenError as exc:
                    # Recorded like the API's refused writes: attempt, then outcome 403.
                    refused = exc

                    async def refuse(_: Ctx) -> WriteResult:
                        raise refused

                    return await self._audited(ctx, action, describe, refuse)
                return await self._audited(ctx, action, describe, handler)
            except CsrfError as exc:
                log.warning("console: %s refused: %s", action, exc)
                return self.error(ctx, request, ERRORS.admin_status(exc), str(exc))
            except EdgefleetError as exc:
                return self.error(ctx, request, ERRORS.admin_status(exc), str(exc))
            except Exception:
                log.exception("console %s failed", action)
                return self.error(ctx, request, ADMIN_INTERNAL_STATUS, "internal error")

        return run

    async def _audited(
        self, ctx: Ctx, action: str, describe: Describe, handler: WriteHandler
    ) -> Response:
        request = ctx.request
        path, body = describe(request, ctx.form)
        if self.auditor is None:
            done = await self._run(handler, ctx)
            return done[0]
        data = json.dumps(body).encode()
        scope = dict(request.scope)
        scope["path_params"] = path
        scope["query_string"] = b"via=console"
        scope["headers"] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        stand_in = _replay(request, data, scope)
        try:
            pending = await self.auditor.attempt(stand_in, actor_of(ctx.principal), action)
        except Exception as exc:
            log.exception("audit log: cannot record console %s; refused", action)
            status = ERRORS.admin_status(exc) if isinstance(exc, EdgefleetError) else 503
            return self.error(ctx, request, status, "the audit log cannot be written: not done")
        response, answer = await self._run(handler, ctx)
        try:
            await self.auditor.outcome(pending, answer)
        except Exception:
            log.exception("audit log: outcome of console %s not recorded", action)
        return response

    async def _run(self, handler: WriteHandler, ctx: Ctx) -> tuple[Response, JSONResponse]:
        """The handler's browser answer and the API-shaped answer the audit records."""
        try:
            done = await handler(ctx)
        except EdgefleetError as exc:
            status = ERRORS.admin_status(exc)
            audit = JSONResponse({"error": str(exc)[:200], "code": exc.code}, status_code=status)
            return self.error(ctx, ctx.request, status, str(exc)), audit
        audit = JSONResponse(dict(done.result), status_code=done.status)
        if done.fragment is not None:
            return _headers(done.fragment), audit
        target = done.redirect or f"{PREFIX}/"
        if ctx.request.headers.get("hx-request") == "true":
            return _headers(Response(status_code=204, headers={"HX-Redirect": target})), audit
        return _headers(RedirectResponse(target, status_code=303)), audit


def form_fields(raw: bytes) -> dict[str, str]:
    """A urlencoded form's fields (the first value of each).

    Raises:
        AdminInputError: not UTF-8.
    """
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise AdminInputError("the form is not UTF-8") from None
    out: dict[str, str] = {}
    for k, v in parse_qsl(text, keep_blank_values=True, max_num_fields=400):
        out.setdefault(k, v)
    return out


def same_origin(request: Request) -> bool:
    """Whether a browser's ``Origin`` (when it sends one) is the console's own origin: a
    cross-site form posting to the login would log the victim in as the attacker."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"{request.url.scheme}://{host}",)


def _when(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text.replace("T", " ")[:19]


def _pct(value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value * 100:.2f}%"


def _num(value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
