"""Admin API routes of device labels, label groups and maintenance windows.

Routes (v1), every one behind the admin guard (``admin.create_app``'s ``guarded``, which also
maps our errors to statuses)::

    GET    /v1/devices/{id}/labels        {"device_id", "operator", "device", "effective",
                                           "refused"}: the operator's labels, the device's own
                                           (as it reported them, valid ones only), the merge a
                                           selector sees, and how many reported entries were
                                           refused
    POST   /v1/devices/{id}/labels        {"set": {KEY: VALUE, ...}?, "remove": [KEY, ...]?}
                                           -> the labels after (operator labels only)
    GET    /v1/label-groups               {"groups": [{"name", "selector", "updated_at",
                                           "members"}, ...]}
    PUT    /v1/label-groups/{name}        {"selector"} -> the group (defines or redefines)
    GET    /v1/label-groups/{name}        the group + "devices": ids of its members now
    DELETE /v1/label-groups/{name}        -> {"deleted": name}
    GET    /v1/windows                    {"windows": [window + "open_now", "next_open"]}
    PUT    /v1/windows/{name}             {"selector", "weekdays"?, "start", "duration_minutes",
                                           "timezone"} -> the window (defines or redefines)
    DELETE /v1/windows/{name}             -> {"deleted": name}

Device listing by selector is ``GET /v1/devices?selector=...`` (or ``?label_group=``) in
``admin.api``. A bad label, selector or window answers 400 (``label_invalid``,
``selector_invalid`` with the position, ``window_invalid``); an unknown device, group or window
404.

Owns: HTTP shapes. Storage is ``fleet_server.registry.labels``', the rules are
``edge_agent.wire.ops.labels``, ``fleet_server.rollouts.label_selector`` and ``.windows``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.admin.body import json_object, query_text, read_body
from fleet_server.errors import AdminInputError, LabelError
from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.windows import MaintenanceWindow

__all__ = ["label_routes", "selected_devices"]

Handler = Callable[[Request], Awaitable[Response]]
_MAX_BODY: Final = 16 * 1024


def selected_devices(registry: Registry, selector: str | None, group: str | None) -> list[str]:
    """Ids of the devices a selector text or a label group's selector matches now.

    Raises:
        SelectorSyntaxError: the selector does not parse.
        UnknownLabelGroupError: no such group.
        RegistryUnavailableError: the database failed.
    """
    if group is not None:
        parsed = label_store.group(registry, group).selector
    else:
        parsed = LabelSelector.parse(selector)
    return label_store.select_device_ids(registry, parsed)


def label_routes(
    registry: Registry,
    guarded: Callable[[Handler], Handler],
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[Route]:
    """The label, label group and window routes over ``registry``, each wrapped by ``guarded``."""

    def name_of(request: Request, what: str) -> str:
        value = query_text(request.path_params, what, limit=128)
        if value is None:
            raise AdminInputError(f"{what} is empty")
        return value

    async def body(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, _MAX_BODY))

    async def show_labels(request: Request) -> Response:
        device_id = name_of(request, "device_id")
        found = await run_in_threadpool(label_store.device_labels, registry, device_id)
        return JSONResponse(found.to_dict())

    async def set_labels(request: Request) -> Response:
        device_id = name_of(request, "device_id")
        data = await body(request)
        if set(data) - {"set", "remove"}:
            raise AdminInputError("the body has only 'set' and 'remove'")
        add, remove = data.get("set") or {}, data.get("remove") or []
        if not isinstance(add, dict):
            raise LabelError("'set' is an object of KEY: VALUE")
        if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
            raise LabelError("'remove' is a list of keys")
        if len(remove) > 64:
            raise LabelError("at most 64 keys to remove")
        found = await run_in_threadpool(
            lambda: label_store.set_labels(registry, device_id, add, remove)
        )
        return JSONResponse(found.to_dict())

    def group_json(g: label_store.LabelGroup, members: list[str] | None) -> dict[str, Any]:
        out = g.to_dict()
        if members is not None:
            out["members"] = len(members)
        return out

    async def list_groups(request: Request) -> Response:
        def read() -> list[dict[str, Any]]:
            return [
                group_json(g, label_store.select_device_ids(registry, g.selector))
                for g in label_store.groups(registry)
            ]

        return JSONResponse({"groups": await run_in_threadpool(read)})

    async def put_group(request: Request) -> Response:
        name = name_of(request, "name")
        data = await body(request)
        if set(data) != {"selector"}:
            raise LabelError("a label group is {'selector': TEXT}")
        selector = LabelSelector.parse(data["selector"])
        g = await run_in_threadpool(
            lambda: label_store.define_group(registry, name, selector, clock())
        )
        return JSONResponse(g.to_dict())

    async def show_group(request: Request) -> Response:
        name = name_of(request, "name")

        def read() -> dict[str, Any]:
            g = label_store.group(registry, name)
            ids = label_store.select_device_ids(registry, g.selector)
            return {**group_json(g, ids), "devices": ids}

        return JSONResponse(await run_in_threadpool(read))

    async def delete_group(request: Request) -> Response:
        name = name_of(request, "name")
        await run_in_threadpool(label_store.delete_group, registry, name)
        return JSONResponse({"deleted": name})

    async def list_windows(request: Request) -> Response:
        now = clock()

        def read() -> list[dict[str, Any]]:
            return [
                {
                    **w.to_dict(),
                    "open_now": w.is_open(now),
                    "next_open": w.next_open(now).isoformat(),
                }
                for w in label_store.windows(registry)
            ]

        return JSONResponse({"windows": await run_in_threadpool(read)})

    async def put_window(request: Request) -> Response:
        name = name_of(request, "name")
        data = await body(request)
        window = MaintenanceWindow.from_dict({**data, "name": name})
        await run_in_threadpool(lambda: label_store.put_window(registry, window, clock()))
        return JSONResponse(window.to_dict())

    async def delete_window(request: Request) -> Response:
        name = name_of(request, "name")
        await run_in_threadpool(label_store.delete_window, registry, name)
        return JSONResponse({"deleted": name})

    return [
        Route("/v1/devices/{device_id}/labels", guarded(show_labels), methods=["GET"]),
        Route("/v1/devices/{device_id}/labels", guarded(set_labels), methods=["POST"]),
        Route("/v1/label-groups", guarded(list_groups), methods=["GET"]),
        Route("/v1/label-groups/{name}", guarded(put_group), methods=["PUT"]),
        Route("/v1/label-groups/{name}", guarded(show_group), methods=["GET"]),
        Route("/v1/label-groups/{name}", guarded(delete_group), methods=["DELETE"]),
        Route("/v1/windows", guarded(list_windows), methods=["GET"]),
        Route("/v1/windows/{name}", guarded(put_window), methods=["PUT"]),
        Route("/v1/windows/{name}", guarded(delete_window), methods=["DELETE"]),
    ]
