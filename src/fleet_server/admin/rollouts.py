"""Admin API routes of quality-gated rollouts (mounted next to ``fleet_server.admin.api``'s).

Routes (v1), every one behind the admin bearer token (the ``guarded`` wrapper of
``admin.create_app``, which also maps our errors to statuses)::

    GET  /v1/rollouts[?active=1]             {"rollouts": [rollout, ...]}
    POST /v1/rollouts                        {"model", "version", "group" | "tags" |
                                              "labels" (a label selector) | "label_group",
                                              "from_version"?, "policy"?,
                                              "override_quarantine"?, "override_aborted"?,
                                              "override_offline"?}
                                             -> 201 rollout (with "offline": the comparison
                                             on the model's evaluation set)
    POST /v1/rollouts                        {"agent": RELEASE, selector and policy as above,
                                              "from_version"? (a release; null: most
                                              devices'), "override_quarantine"?,
                                              "override_aborted"?} -> 201 rollout of an agent
                                             release (model "agent:edgefleet")
    GET  /v1/rollouts/{id}                   rollout + "devices" (state per device), "counts",
                                             "wave_sizes", "holds" (held members: reason
                                             and when their window opens), "events"
    POST /v1/rollouts/{id}/approve|pause|resume|abort  -> rollout
    GET  /v1/models/{name}/{version}         the published bundle + "history" (aborts,
                                             quarantine, overrides) + "rollouts" of it

A rollout is ``registry.rollout_to_dict``'s shape. A command that does not fit the rollout's
state (``rollout_state``), a quarantined version (``version_quarantined``) and an earlier
aborted one (``version_aborted``) and a candidate that regressed on the model's evaluation set
(``offline_regression``) without an override reason answer 409, an offline comparison that
cannot run (``offline_check_failed``) 422; an invalid policy or
override reason 400; an unknown rollout or model version 404 (the one error table's ``admin``
column, ``fleet_server.errors.ERRORS``, applied by ``guarded``).

Owns: HTTP and JSON shapes. Decisions live in ``fleet_server.rollouts.engine``, I/O in the runner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.admin.api import model_json
from fleet_server.admin.body import MAX_ID, json_object, query_text, read_body
from fleet_server.errors import (
    ModelNotPublishedError,
    RegistryError,
    RegistryUnavailableError,
    RolloutPolicyError,
)
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import labels as label_store
from fleet_server.registry import rollouts as store
from fleet_server.registry.rollouts import rollout_to_dict
from fleet_server.registry.version_history import VersionHistory, version_history
from fleet_server.rollouts.admission import MAX_OVERRIDE_REASON
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import AGENT_ROLLOUT, Rollout

__all__ = ["rollout_routes", "rollout_status"]

Handler = Callable[[Request], Awaitable[Response]]
MAX_BODY = 64 * 1024
COMMANDS = ("approve", "pause", "resume", "abort")


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
    out["holds"] = runner.holds(r)
    if events:
        out["events"] = [
            {"at": e.at.isoformat(), "kind": e.kind, "detail": dict(e.detail)}
            for e in store.rollout_events(runner.registry, r.id, limit=50)
        ]
    return out


def _text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()


def _parse_create(data: Any) -> dict[str, Any]:
    """Validate a create body. Raises: RolloutPolicyError (the message names the field)."""
    if not isinstance(data, dict):
        raise RolloutPolicyError("body must be a JSON object")
    if "agent" in data:
        # An agent release: ``{"agent": N}`` instead of ``model`` and ``version``.
        if "model" in data or "version" in data or data.get("override_offline"):
            raise RolloutPolicyError(
                "an agent rollout takes 'agent' (a release), no 'model', 'version' or "
                "'override_offline' (agent releases have no evaluation set)"
            )
        data = {**data, "model": AGENT_ROLLOUT, "version": data["agent"]}
    model, version = data.get("model"), data.get("version")
    if not _text(model):
        raise RolloutPolicyError("field 'model' must be a printable string of 1-128 characters")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_ID:
        raise RolloutPolicyError(f"field 'version' must be an integer in 1..{MAX_ID}")
    frm = data.get("from_version")
    if frm is not None and (
        not isinstance(frm, int) or isinstance(frm, bool) or not 0 <= frm <= MAX_ID
    ):
        raise RolloutPolicyError(f"field 'from_version' must be an integer in 0..{MAX_ID} or null")
    group, tags = data.get("group"), data.get("tags") or {}
    labels = data.get("labels")
    selector = None if labels is None else LabelSelector.parse(labels)
    if group is not None and not _text(group):
        raise RolloutPolicyError("field 'group' must be a printable string of 1-128 characters")
    if (
        not isinstance(tags, dict)
        or len(tags) > 64
        or not all(_text(k) and _text(v) for k, v in tags.items())
    ):
        raise RolloutPolicyError("field 'tags' must be an object of printable strings")
    overrides = {}
    for key in ("override_quarantine", "override_aborted", "override_offline"):
        value = data.get(key) or ""
        if not isinstance(value, str) or len(value) > MAX_OVERRIDE_REASON:
            raise RolloutPolicyError(
                f"field {key!r} must be a reason of at most {MAX_OVERRIDE_REASON} characters"
            )
        overrides[key] = value
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise RolloutPolicyError("field 'policy' must be an object")
    try:
        parsed = RolloutPolicy.from_dict(policy)
    # The policy's own checks compare and convert values; a value of a type or size they did
    # not expect is still an invalid policy, not a server error.
    except (TypeError, ValueError, OverflowError, ArithmeticError) as exc:
        raise RolloutPolicyError(f"invalid policy: {type(exc).__name__}: {exc}") from exc
    return {
        "agent": model == AGENT_ROLLOUT,
        "model": model,
        "version": version,
        "from_version": frm,
        "selector": Selector(group=group, tags=tags, labels=selector),
        "policy": parsed,
        **overrides,
    }


def model_version_status(runner: RolloutRunner, name: str, version: int) -> dict[str, Any]:
    """One published model version with its history of failure and its rollouts.

    Raises:
        ModelNotPublishedError: the version is not published.
        RegistryUnavailableError: the database failed.
    """
    registry = runner.registry
    try:
        bundle = registry.get_bundle(name, version)
    except RegistryUnavailableError:
        raise
    except RegistryError as exc:
        raise ModelNotPublishedError(str(exc)) from exc
    history = version_history(registry, name, version).get((name, version))
    rows = [r for r in runner.rollouts() if r.model == name and r.to_version == version]
    return {
        **model_json(bundle),
        "history": (history or VersionHistory(name, version)).to_dict(),
        "rollouts": [
            {
                "id": r.id,
                "state": r.state,
                "from_version": r.from_version,
                "created_at": r.created_at.isoformat(),
                "breached": r.breached,
                "overrides": [o.to_dict() for o in r.overrides],
            }
            for r in rows
        ],
    }


def _rollout_id(request: Request) -> str:
    value = query_text(request.path_params, "rollout_id", limit=128)
    if value is None:
        raise RolloutPolicyError("rollout id is empty")
    return value


def rollout_routes(runner: RolloutRunner, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The rollout routes over ``runner``, each wrapped by ``guarded`` (auth + error mapping)."""

    async def list_rollouts(request: Request) -> Response:
        active = request.query_params.get("active") in {"1", "true", "yes"}
        rows = await run_in_threadpool(lambda: runner.rollouts(active_only=active))
        return JSONResponse({"rollouts": [rollout_to_dict(r) for r in rows]})

    async def create(request: Request) -> Response:
        body = json_object(await read_body(request, MAX_BODY))
        if "label_group" in body:
            name = body.pop("label_group")
            if not _text(name) or "labels" in body:
                raise RolloutPolicyError("'label_group' is a group name, instead of 'labels'")
            # A label group's selector is copied into the rollout: redefining the group later
            # does not move a running rollout; the selector is re-evaluated at every step.
            found = await run_in_threadpool(lambda: label_store.group(runner.registry, name))
            body["labels"] = str(found.selector)
        args = _parse_create(body)
        if args["agent"]:
            r = await run_in_threadpool(
                lambda: runner.create_agent(
                    args["version"],
                    selector=args["selector"],
                    policy=args["policy"],
                    from_release=args["from_version"],
                    override_quarantine=args["override_quarantine"],
                    override_aborted=args["override_aborted"],
                )
            )
            return JSONResponse(rollout_to_dict(r), status_code=201)
        r = await run_in_threadpool(
            lambda: runner.create(
                args["model"],
                args["version"],
                selector=args["selector"],
                policy=args["policy"],
                from_version=args["from_version"],
                override_quarantine=args["override_quarantine"],
                override_aborted=args["override_aborted"],
                override_offline=args["override_offline"],
            )
        )
        return JSONResponse(rollout_to_dict(r), status_code=201)

    async def show(request: Request) -> Response:
        rollout_id = _rollout_id(request)
        out = await run_in_threadpool(lambda: rollout_status(runner, runner.get(rollout_id)))
        return JSONResponse(out)

    async def show_model(request: Request) -> Response:
        name = query_text(request.path_params, "name", limit=128)
        raw = str(request.path_params.get("version", ""))
        # isascii: '²'.isdigit() is True (int() then raises) and int('\u0661') is 1.
        if not name or not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ID:
            raise RolloutPolicyError(f"model version must be an integer in 1..{MAX_ID}")
        out = await run_in_threadpool(lambda: model_version_status(runner, name, int(raw)))
        return JSONResponse(out)

    def command(name: str) -> Handler:
        async def run(request: Request) -> Response:
            rollout_id = _rollout_id(request)
            r = await run_in_threadpool(getattr(runner, name), rollout_id)
            return JSONResponse(rollout_to_dict(r))

        return run

    routes = [
        Route("/v1/rollouts", guarded(list_rollouts), methods=["GET"]),
        Route("/v1/rollouts", guarded(create), methods=["POST"]),
        Route("/v1/rollouts/{rollout_id}", guarded(show), methods=["GET"]),
        Route("/v1/models/{name}/{version}", guarded(show_model), methods=["GET"]),
    ]
    routes += [
        Route(f"/v1/rollouts/{{rollout_id}}/{c}", guarded(command(c)), methods=["POST"])
        for c in COMMANDS
    ]
    return routes
