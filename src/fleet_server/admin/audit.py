"""The admin API's audit trail: what the entry of a request holds, and writing it.

Recording happens in one place, the guard of ``fleet_server.admin.api.create_app``: for every
authenticated request that is not a GET it calls ``Auditor.attempt`` (the actor: the caller's
account, ``fleet_server.admin.auth.actor_of``) before the handler runs and ``Auditor.outcome``
after (also for refusals: 400, 403, 404, 409, 413, 422, ...). When the
attempt cannot be written the handler does not run and the request answers 503: an action is
never done without its entry. When the outcome cannot be written the action has already run
and its attempt is in the log; the answer is the handler's and the server log says why the
outcome is missing.

An entry's ``change`` is the request's input as data: path and query values, the JSON body's
fields (values under secret-looking keys replaced by ``"<redacted>"``, strings cut to
``MAX_STRING`` characters, the whole cut to ``MAX_CHANGE_BYTES`` of JSON), or for a binary
body (bundle, evaluation set) its type and length only. The ``Authorization`` header is never
stored. Unauthenticated requests are not recorded (anyone could fill the registry with them);
the guard logs them.

Owns: the above. Does not own the table nor its queries (``fleet_server.registry.audit``), nor
the routes that read the log and its output formats (``fleet_server.admin.audit_routes``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from edge_agent import strict_json
from edge_agent.errors import EdgefleetError
from fleet_server.admin.body import read_body
from fleet_server.errors import AdminInputError
from fleet_server.registry.audit import Actor, AuditEntry, append_entry
from fleet_server.registry.store import Registry

__all__ = [
    "MAX_CHANGE_BYTES",
    "MAX_STRING",
    "Auditor",
    "PendingAudit",
    "bounded",
    "change_of",
    "object_of",
]

MAX_STRING: Final = 256
MAX_CHANGE_BYTES: Final = 4096
_SECRET = re.compile(r"token|secret|passw|private|credential|authorization", re.IGNORECASE)


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON data with secrets redacted and strings cut (depth-limited)."""
    if isinstance(value, str):
        return value[:MAX_STRING]
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= 4:
        return "<nested>"
    if isinstance(value, Mapping):
        return {
            str(k)[:64]: "<redacted>" if _SECRET.search(str(k)) else bounded(v, depth + 1)
            for k, v in list(value.items())[:64]
        }
    if isinstance(value, list | tuple):
        return [bounded(v, depth + 1) for v in value[:64]]
    return str(value)[:MAX_STRING]


def change_of(
    path: Mapping[str, Any], query: Mapping[str, str], body: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What a request asks to change, bounded (see the module docstring).

    ``body`` is the parsed JSON body, or a description of a body that was not parsed.
    """
    change: dict[str, Any] = {}
    if path:
        change["path"] = bounded(dict(path))
    if query:
        change["query"] = bounded(dict(query))
    if body:
        change["body"] = bounded(dict(body))
    size = len(json.dumps(change))
    if size > MAX_CHANGE_BYTES:
        fields = sorted(str(k)[:64] for k in (body or {}))[:32]
        change = {
            "truncated": size,
            "path": change.get("path", {}),
            "body_fields": fields,
        }
        if len(json.dumps(change)) > MAX_CHANGE_BYTES:
            change = {"truncated": size}
    return change


def object_of(path: Mapping[str, Any], query: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The object a request acts on, e.g. ``device:cam-1``, ``model:digits@2``, ``rollout:7``,
    ``account:alice``, ``api_token:0f3a...`` (``api_token:new``: the caller's own new token)."""

    def text(v: Any) -> str:
        return str(v)[:128]

    if "device_id" in path:
        return f"device:{text(path['device_id'])}"
    if "rollout_id" in path:
        return f"rollout:{text(path['rollout_id'])}"
    if "token_id" in path:
        return f"api_token:{text(path['token_id'])}"
    if "name" in path and "version" not in path:  # /v1/accounts/{name}/...
        return f"account:{text(path['name'])}"
    if "role" in body or "expires_days" in body:  # a new account or API token
        named = body.get("name", body.get("account"))
        return "api_token:new" if named is None else f"account:{text(named)}"
    if "target" in body:
        kind = "group" if body.get("group") is True else "device"
        out = f"{kind}:{text(body['target'])}"
        if "model" in body:
            out += f" model:{text(body['model'])}@{text(body.get('version'))}"
        return out
    if "id" in body:
        return f"device:{text(body['id'])}"
    if "model" in body:
        return f"model:{text(body['model'])}@{text(body.get('version'))}"
    if "name" in body and "version" in body:  # a published bundle (from its response)
        return f"model:{text(body['name'])}@{text(body['version'])}"
    if "sha256" in body:
        return f"bundle:{text(body['sha256'])}"
    if "model" in query:
        return f"model:{text(query['model'])}"
    return ""


class PendingAudit:
    """An attempt that is recorded; ``Auditor.outcome`` completes it.

    ``request`` replays the body the auditor read (hand it to the handler); ``refusal`` is set
    when reading the body already failed (answer it instead of running the handler).
    """

    def __init__(
        self, entry: AuditEntry, request: Request, refusal: EdgefleetError | None = None
    ) -> None:
        """Wrap the recorded ``entry``."""
        self.entry = entry
        self.request = request
        self.refusal = refusal


class Auditor:
    """Writes the audit entries of admin requests to the registry."""

    def __init__(
        self, registry: Registry, clock: Callable[[], datetime], *, max_body_bytes: int
    ) -> None:
        """Record into ``registry`` at ``clock()``; JSON bodies over ``max_body_bytes`` are
        refused (413) as the routes would refuse them."""
        self._registry = registry
        self._clock = clock
        self._max_body = max_body_bytes

    @property
    def registry(self) -> Registry:
        """The registry the entries go to (and the audit routes read)."""
        return self._registry

    async def attempt(self, request: Request, actor: Actor, action: str) -> PendingAudit:
        """Record that ``actor`` asks ``action``; the request to hand on to the handler.

        A JSON body is read here (capped) and replayed to the handler; a body over the cap or
        with a malformed length is the pending attempt's ``refusal``.

        Raises:
            RegistryUnavailableError: the entry could not be written (the action must not run).
        """
        path = dict(request.path_params)
        query = dict(request.query_params)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body: dict[str, Any] = {}
        replay = request
        failure: EdgefleetError | None = None
        declared = request.headers.get("content-length", "")
        # A JSON body is read (capped, as the routes cap it); an untyped one only when it
        # declares a length within the cap (a bundle sent without a type must still upload).
        small = (
            declared.isascii()
            and declared.isdigit()
            and len(declared) <= 19
            and int(declared) <= self._max_body
        )
        if ctype == "application/json" or (ctype == "" and (small or not declared)):
            try:
                raw = await read_body(request, self._max_body)
            except AdminInputError as exc:  # the too-large error is a subclass
                failure, raw = exc, b""
            replay = _replaying(request, raw)
            if raw:
                try:
                    parsed = strict_json.loads(raw, max_bytes=len(raw), what="body")
                    body = parsed if isinstance(parsed, dict) else {"<body>": "not an object"}
                except EdgefleetError:
                    body = {"<body>": "not JSON"}
        else:
            body = {
                "<body>": ctype[:64],
                "<length>": declared[:20],
            }
        entry = AuditEntry(
            request_id=uuid.uuid4().hex,
            phase="attempt",
            actor=str(actor),
            client=request.client.host if request.client else "",
            action=action,
            object=object_of(path, query, body),
            change=change_of(path, query, body),
        )
        stored = await run_in_threadpool(append_entry, self._registry, entry, self._clock())
        return PendingAudit(stored, replay, failure)

    async def event(
        self, actor: Actor, client: str, action: str, obj: str, status: int, code: str = ""
    ) -> None:
        """Record an action that is not an admin route (a console login or logout): its
        attempt and outcome rows at once, sharing one ``request_id``.

        Raises:
            RegistryUnavailableError: the entries could not be written.
        """
        request_id = uuid.uuid4().hex
        attempt = AuditEntry(request_id, "attempt", str(actor), client, action, obj, {})
        outcome = AuditEntry(
            request_id, "outcome", str(actor), client, action, obj, {}, status, code[:64]
        )
        for entry in (attempt, outcome):
            await run_in_threadpool(append_entry, self._registry, entry, self._clock())

    async def outcome(self, pending: PendingAudit, response: Response) -> None:
        """Record the outcome of ``pending``: status, error code, ids the answer names.

        Raises:
            RegistryUnavailableError: the entry could not be written.
        """
        code, result = "", dict[str, Any]()
        data = _response_json(response)
        if response.status_code >= 400:
            code = str(data.get("code", ""))[:64]
        else:
            result = {k: data[k] for k in ("id", "name", "version", "sha256") if k in data}
        a = pending.entry
        entry = AuditEntry(
            a.request_id,
            "outcome",
            a.actor,
            a.client,
            a.action,
            a.object or object_of({}, {}, result),
            {"result": bounded(result)} if result else {},
            response.status_code,
            code,
        )
        await run_in_threadpool(append_entry, self._registry, entry, self._clock())


def _response_json(response: Response) -> dict[str, Any]:
    if not isinstance(response, JSONResponse):
        return {}
    try:
        data = json.loads(bytes(response.body))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _replaying(request: Request, raw: bytes) -> Request:
    """A request over the same scope whose body is ``raw`` (already read from the socket)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)
