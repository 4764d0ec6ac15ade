"""Admin API routes of remote diagnostics (mounted next to ``fleet_server.admin.api``'s).

Routes (v1), behind the admin bearer token; the POSTs are recorded in the audit log by the
guard like every state-changing admin action::

    POST /v1/devices/{device_id}/commands   {"name": "logs", "args": {...}, "ttl_seconds": 3600}
                                            -> 202 {"commands": [record], "errors": {}}
    POST /v1/groups/{group}/commands        same body: one command per active device of the
                                            group -> 202 {"commands": [...], "errors": {id: why}}
    GET  /v1/devices/{device_id}/commands   {"commands": [record, ...]} newest first (?limit=)
    GET  /v1/commands/{command_id}          record
    GET  /v1/devices/{device_id}/support-bundles/{command_id}
                                            the verified tar.gz (application/gzip)
    GET  /v1/diagnostics/stats              counters (issued, answered, refused by code, ...)

A record is ``CommandBook``'s view: ``id``, ``device_id``, ``name``, ``args``, ``sequence``,
``issued``/``expires`` (UNIX seconds), ``state`` (pending, answered, refused, expired,
uploading, uploaded, upload_failed), the device's ``answer`` (JSON as the device sent it:
device-supplied strings, shown escaped by any client that renders them) and ``upload``.

Owns: HTTP and JSON shapes. Everything else is ``fleet_server.diagnostics.service``'s.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from edge_agent.errors import IdentityError
from edge_agent.ids import validate_device_id
from edge_agent.trust.command import MAX_COMMAND_TTL
from fleet_server.admin.body import json_object, query_int, read_body, req_field
from fleet_server.diagnostics.service import Diagnostics, IssueResult
from fleet_server.errors import AdminInputError

__all__ = ["diagnostics_routes"]

Handler = Callable[[Request], Awaitable[Response]]
MAX_BODY: Final = 16 * 1024
_COMMAND_ID = re.compile(r"[0-9a-f]{32}")
_GROUP = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _device(request: Request) -> str:
    raw = str(request.path_params["device_id"])
    try:
        return validate_device_id(raw)
    except IdentityError as exc:
        raise AdminInputError(f"invalid device id {raw[:64]!r}") from exc


def _command_id(request: Request) -> str:
    raw = str(request.path_params["command_id"])
    if not _COMMAND_ID.fullmatch(raw):
        raise AdminInputError("a command id is 32 lowercase hex characters")
    return raw


def _body(raw: bytes) -> tuple[str, dict[str, Any], timedelta]:
    data = json_object(raw)
    unknown = set(data) - {"name", "args", "ttl_seconds"}
    if unknown:
        raise AdminInputError(f"unknown fields {sorted(unknown)[:8]}")
    name = req_field(data, "name", str, limit=32)
    args = data.get("args", {})
    if not isinstance(args, dict) or len(args) > 8:
        raise AdminInputError("field 'args' must be an object of at most 8 arguments")
    ttl = req_field(data, "ttl_seconds", int, 3600, lo=1, hi=int(MAX_COMMAND_TTL.total_seconds()))
    return name, args, timedelta(seconds=ttl)


def _issued(result: IssueResult) -> Response:
    return JSONResponse(
        {"commands": [c.to_dict() for c in result.commands], "errors": result.errors},
        status_code=202,
    )


def diagnostics_routes(
    diagnostics: Diagnostics, guarded: Callable[[Handler], Handler]
) -> list[Route]:
    """The diagnostics routes over ``diagnostics``, each wrapped by ``guarded``."""

    async def issue_device(request: Request) -> Response:
        device_id = _device(request)
        name, args, ttl = _body(await read_body(request, MAX_BODY))
        result = await run_in_threadpool(
            lambda: diagnostics.issue(name, args, device_id=device_id, ttl=ttl)
        )
        return _issued(result)

    async def issue_group(request: Request) -> Response:
        group = str(request.path_params["group"])
        if not _GROUP.fullmatch(group):
            raise AdminInputError("invalid group name")
        name, args, ttl = _body(await read_body(request, MAX_BODY))
        result = await run_in_threadpool(
            lambda: diagnostics.issue(name, args, group=group, ttl=ttl)
        )
        return _issued(result)

    async def device_commands(request: Request) -> Response:
        device_id = _device(request)
        limit = query_int(request.query_params, "limit", 50, lo=1, hi=1000)
        records = await run_in_threadpool(diagnostics.of_device, device_id, limit)
        return JSONResponse({"commands": [r.to_dict() for r in records]})

    async def command(request: Request) -> Response:
        record = await run_in_threadpool(diagnostics.get, _command_id(request))
        return JSONResponse(record.to_dict())

    async def support_bundle(request: Request) -> Response:
        device_id, command_id = _device(request), _command_id(request)
        path = await run_in_threadpool(diagnostics.bundle_path, device_id, command_id)
        return FileResponse(
            path,
            media_type="application/gzip",
            filename=f"support-bundle-{device_id}-{command_id[:8]}.tar.gz",
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(diagnostics.stats())

    return [
        Route("/v1/devices/{device_id}/commands", guarded(issue_device), methods=["POST"]),
        Route("/v1/groups/{group}/commands", guarded(issue_group), methods=["POST"]),
        Route("/v1/devices/{device_id}/commands", guarded(device_commands), methods=["GET"]),
        Route("/v1/commands/{command_id}", guarded(command), methods=["GET"]),
        Route(
            "/v1/devices/{device_id}/support-bundles/{command_id}",
            guarded(support_bundle),
            methods=["GET"],
        ),
        Route("/v1/diagnostics/stats", guarded(stats), methods=["GET"]),
    ]
