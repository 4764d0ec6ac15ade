"""Admin API routes of the fleet's root of trust (mounted next to ``fleet_server.admin.api``'s).

Routes (v1), behind the admin bearer token (``admin.create_app``'s ``guarded`` wrapper, which
also maps our errors: a refused root is a ``BundleVerificationError``, 400)::

    GET  /v1/root      {"version", "expires", "chain": [versions shipped], "roles": {role:
                        {"threshold", "keyids"}}}
    POST /v1/root      {"roots": [<root metadata object>, ...]} (versions in order; known ones
                        are skipped) -> 200 {"version", "previous", "devices": [{"device_id",
                        "desired_version", "published", "error"}]}

Owns: HTTP and JSON shapes. The rotation rule is ``edge_agent.trust``'s; storing the chain and
re-publishing desired states is ``FleetService.rotate_root``'s.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent.errors import MetadataFormatError, RootRotationError
from edge_agent.trust import ROLES, TrustedRoot
from edge_agent.trust.rotation import MAX_CHAIN_LENGTH
from fleet_server.admin.body import json_object, read_body
from fleet_server.service import FleetService

__all__ = ["root_routes", "root_to_dict"]

Handler = Callable[[Request], Awaitable[Response]]
#: 64 roots of a few KiB each, with room to spare.
MAX_BODY = 1024 * 1024


def root_to_dict(root: TrustedRoot, chain: list[int]) -> dict[str, Any]:
    """The public view of a root: version, expiry, each role's keys and threshold."""
    return {
        "version": root.version,
        "expires": root.expires.isoformat(),
        "chain": chain,
        "roles": {
            r: {"threshold": root.threshold(r), "keyids": list(root.keyids(r))} for r in ROLES
        },
    }


def _chain_versions(service: FleetService) -> list[int]:
    roots = service.roots
    if roots is None:
        return []
    return [int(json.loads(d)["signed"]["version"]) for d in roots.chain()]


def _parse_chain(body: dict[str, Any]) -> list[bytes]:
    """The ``roots`` list of a POST body as metadata bytes.

    Raises:
        MetadataFormatError: missing, not a list of objects, or too long.
    """
    roots = body.get("roots")
    if not isinstance(roots, list) or not roots or len(roots) > MAX_CHAIN_LENGTH:
        raise MetadataFormatError(
            f"field 'roots' must be a list of 1..{MAX_CHAIN_LENGTH} root metadata objects"
        )
    if not all(isinstance(r, dict) for r in roots):
        raise MetadataFormatError("each entry of 'roots' must be a root metadata object")
    return [json.dumps(r).encode() for r in roots]


def root_routes(service: FleetService, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The root routes over ``service``, each wrapped by ``guarded`` (auth + error mapping)."""

    async def show(request: Request) -> Response:
        root = service.root()
        if root is None:
            raise RootRotationError("this server was started without a root chain")
        return JSONResponse(root_to_dict(root, await run_in_threadpool(_chain_versions, service)))

    async def rotate(request: Request) -> Response:
        chain = _parse_chain(json_object(await read_body(request, MAX_BODY)))
        before = service.root()
        root, results = await run_in_threadpool(service.rotate_root, chain)
        return JSONResponse(
            {
                "version": root.version,
                "previous": None if before is None else before.version,
                "devices": [
                    {
                        "device_id": r.device_id,
                        "desired_version": r.desired_version,
                        "published": r.published,
                        "error": r.error,
                    }
                    for r in results
                ],
            }
        )

    return [
        Route("/v1/root", guarded(show), methods=["GET"]),
        Route("/v1/root", guarded(rotate), methods=["POST"]),
    ]
