"""Admin API routes of quality-gated rollouts (mounted next to ``fleet_server.admin``'s).

Routes (v1), every one behind the admin bearer token (the ``guarded`` wrapper of
``admin.create_app``, which also maps our errors to statuses)::

    GET  /v1/rollouts[?active=1]             {"rollouts": [rollout, ...]}
    POST /v1/rollouts                        {"model", "version", "group" | "tags",
                                              "from_version"?, "policy"?} -> 201 rollout
    GET  /v1/rollouts/{id}                   rollout + "devices" (state per device), "counts",
                                             "wave_sizes", "events" (latest 50)
    POST /v1/rollouts/{id}/approve|pause|resume|abort  -> rollout

A rollout is ``registry.rollout_to_dict``'s shape. A command that does not fit the rollout's
state (``rollout_state``) and a quarantined version (``version_quarantined``) answer 409; an
invalid policy 400; an unknown rollout 404.

Owns: HTTP and JSON shapes. Decisions live in ``fleet_server.rollout``, I/O in the runner.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.errors import QuarantinedVersionError, RolloutPolicyError, RolloutStateError
from fleet_server.registry import rollout_to_dict
from fleet_server.registry import rollouts as store
from fleet_server.rollout import Rollout, RolloutPolicy, Selector
from fleet_server.rollout_runner import RolloutRunner

__all__ = ["rollout_routes", "rollout_status"]

Handler = Callable[[Request], Awaitable[Response]]
MAX_BODY = 64 * 1024
COMMANDS = ("approve", "pause", "resume", "abort")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def rollout_status(runner: RolloutRunner, r: Rollout, *, events: bool = True) -> dict[str, Any]:
    """A rollout with its devices' states, wave sizes and (optionally) latest events.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    out = rollout_to_dict(r)
    states = runner.device_states(r)
    out["devices"] = states
    out["counts"] = dict(Counter(states.values()))
    out["wave_sizes"] = list(r.policy.wave_sizes(len(states)))
    if events:
        out["events"] = [
            {"at": e.at.isoformat(), "kind": e.kind, "detail": dict(e.detail)}
            for e in store.rollout_events(runner.registry, r.id, limit=50)
        ]
    return out


def _parse_create(data: Any) -> dict[str, Any]:
    """Validate a create body. Raises: RolloutPolicyError (the message names the field)."""
    if not isinstance(data, dict):
        raise RolloutPolicyError("body must be a JSON object")
    model, version = data.get("model"), data.get("version")
    if not isinstance(model, str) or not model:
        raise RolloutPolicyError("field 'model' must be a non-empty string")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RolloutPolicyError("field 'version' must be a positive integer")
    frm = data.get("from_version")
    if frm is not None and (not isinstance(frm, int) or isinstance(frm, bool)):
        raise RolloutPolicyError("field 'from_version' must be an integer or null")
    group, tags = data.get("group"), data.get("tags") or {}
    if group is not None and not isinstance(group, str):
        raise RolloutPolicyError("field 'group' must be a string")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise RolloutPolicyError("field 'tags' must be an object of strings")
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise RolloutPolicyError("field 'policy' must be an object")
    return {
        "model": model,
        "version": version,
        "from_version": frm,
        "selector": Selector(group=group, tags=tags),
        "policy": RolloutPolicy.from_dict(policy),
    }


def rollout_routes(runner: RolloutRunner, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The rollout routes over ``runner``, each wrapped by ``guarded`` (auth + error mapping)."""

    def conflicts(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except (RolloutStateError, QuarantinedVersionError) as exc:
                return _error(409, exc.code, str(exc))

        return run

    async def list_rollouts(request: Request) -> Response:
        active = request.query_params.get("active") in {"1", "true", "yes"}
        rows = await run_in_threadpool(lambda: runner.rollouts(active_only=active))
        return JSONResponse({"rollouts": [rollout_to_dict(r) for r in rows]})

    async def create(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return _error(413, "too_large", f"request body over {MAX_BODY} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(413, "too_large", f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return _error(400, "bad_json", f"body is not JSON: {exc}")
        args = _parse_create(data)
        r = await run_in_threadpool(
            lambda: runner.create(
                args["model"],
                args["version"],
                selector=args["selector"],
                policy=args["policy"],
                from_version=args["from_version"],
            )
        )
        return JSONResponse(rollout_to_dict(r), status_code=201)

    async def show(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        out = await run_in_threadpool(lambda: rollout_status(runner, runner.get(rollout_id)))
        return JSONResponse(out)

    def command(name: str) -> Handler:
        async def run(request: Request) -> Response:
            rollout_id = request.path_params["rollout_id"]
            r = await run_in_threadpool(getattr(runner, name), rollout_id)
            return JSONResponse(rollout_to_dict(r))

        return run

    routes = [
        Route("/v1/rollouts", guarded(list_rollouts), methods=["GET"]),
        Route("/v1/rollouts", guarded(conflicts(create)), methods=["POST"]),
        Route("/v1/rollouts/{rollout_id}", guarded(show), methods=["GET"]),
    ]
    routes += [
        Route(f"/v1/rollouts/{{rollout_id}}/{c}", guarded(conflicts(command(c))), methods=["POST"])
        for c in COMMANDS
    ]
    return routes
