"""Console pages of the fleet: overview, the device list (filtered and paged in SQL) and one
device (reported state, telemetry charts, events, drift alerts, versions), plus its writes
(revoke).

Owns: reading query values, calling ``FleetService`` (the service the admin API's device
routes call) and rendering. Does not own the session and audit checks
(``fleet_server.console.web``) nor the charts (``fleet_server.console.charts``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fleet_server.admin.body import query_int, query_text
from fleet_server.console.charts import series_svg
from fleet_server.console.shaping import clip, device_series, events_of, flat_rows
from fleet_server.console.web import PREFIX, Console, Ctx, WriteResult
from fleet_server.errors import AdminInputError, SelectorSyntaxError
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import labels as label_store
from fleet_server.registry.values import DeviceFilter
from fleet_server.rollouts.label_selector import MAX_SELECTOR_CHARS, LabelSelector
from fleet_server.service import DeviceView, FleetService

__all__ = ["DEVICE_PAGE", "FleetPages", "device_filter"]

DEVICE_PAGE: Final = 50
_STATES: Final = ("", "online", "offline", "active", "revoked")
_TELEMETRY_ROWS: Final = 500


@dataclass(frozen=True)
class DeviceQuery:
    """The device list's filter as the page shows it (and as links repeat it)."""

    group: str
    tag: str
    state: str
    version: str
    page: int
    labels: str = ""

    def link(self, page: int) -> str:
        """The list's URL at ``page`` with the same filter."""
        params = {
            k: v
            for k, v in (
                ("group", self.group),
                ("tag", self.tag),
                ("state", self.state),
                ("version", self.version),
                ("labels", self.labels),
            )
            if v
        }
        params["page"] = str(page)
        return f"{PREFIX}/devices?{urlencode(params)}"


def device_filter(params: Mapping[str, str]) -> tuple[DeviceQuery, DeviceFilter, str | None]:
    """The filter of the device list's query values: as shown, as the registry's, and the
    presence state for the service.

    ``tag`` is ``key=value``; ``version`` is ``model`` or ``model@version``; ``state`` is
    ``online``, ``offline``, ``active`` or ``revoked``; ``labels`` is a label selector
    (``site=berlin-2,hardware in (aarch64)``, the rollouts' syntax).

    Raises:
        AdminInputError: a malformed, too long or out-of-range value.
    """
    group = query_text(params, "group", limit=128) or ""
    tag = query_text(params, "tag", limit=200) or ""
    state = query_text(params, "state", limit=16) or ""
    version = query_text(params, "version", limit=160) or ""
    labels = query_text(params, "labels", limit=MAX_SELECTOR_CHARS) or ""
    page = query_int(params, "page", 1, lo=1, hi=1_000_000)
    if state not in _STATES:
        raise AdminInputError(f"state must be one of {', '.join(s for s in _STATES if s)}")
    tag_pair = None
    if tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise AdminInputError("tag must be key=value")
        tag_pair = (key, value)
    model, version_no = None, None
    if version:
        name, at, number = version.partition("@")
        model = name or None
        if at:
            if not (number.isascii() and number.isdigit()) or len(number) > 18:
                raise AdminInputError("version must be model or model@<integer>")
            version_no = int(number)
    try:
        selector = LabelSelector.parse(labels) if labels else None
    except SelectorSyntaxError as exc:
        raise AdminInputError(f"labels: {exc}") from exc
    shown = DeviceQuery(group, tag, state, version, page, labels)
    f = DeviceFilter(
        group=group or None,
        tag=tag_pair,
        revoked={"active": False, "revoked": True}.get(state),
        model=model,
        version=version_no,
        selector=selector,
        offset=(page - 1) * DEVICE_PAGE,
        limit=DEVICE_PAGE,
    )
    return shown, f, state if state in ("online", "offline") else None


def device_row(v: DeviceView, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One device as the list shows it, with its effective ``labels`` (device-supplied text
    clipped; the template escapes it)."""
    r = v.record
    models = (r.reported or {}).get("models") if r.reported else None
    running = []
    for name, m in list(models.items())[:8] if isinstance(models, Mapping) else []:
        active = m.get("active") if isinstance(m, Mapping) else None
        running.append(f"{clip(name, 64)}@{clip(active, 20)}")
    pairs = sorted((labels or {}).items())[:16]
    return {
        "id": r.id,
        "group": r.group,
        "tags": [(clip(k, 64), clip(val, 64)) for k, val in list(r.tags.items())[:16]],
        # A valid key is at most 317 characters and a value 63 (``edge_agent.wire.ops.labels``):
        # only what is invalid anyway is clipped.
        "labels": [(clip(k, 320), clip(val, 128)) for k, val in pairs],
        "online": v.online is not None and v.online.state == "online",
        "revoked": r.revoked,
        "last_seen": r.last_seen,
        "running": running,
        "desired": None if v.desired is None else v.desired.version,
    }


class FleetPages:
    """The overview and device pages over ``service`` (and ``runner`` for active rollouts)."""

    def __init__(self, console: Console, service: FleetService, runner: RolloutRunner) -> None:
        """Serve the pages through ``console``."""
        self.console = console
        self.service = service
        self.runner = runner

    async def overview(self, ctx: Ctx) -> Response:
        """Online/offline counts, versions in service, alerts and active rollouts."""

        def read() -> dict[str, Any]:
            st = self.service.status()
            registry = self.runner.registry
            versions = registry.active_versions()
            rows = self.service.telemetry(limit=_TELEMETRY_ROWS)
            alerts = [e for e in events_of(rows) if e["kind"] in _ALERT_KINDS][:20]
            return {
                "status": st,
                "offline": max(0, st.active - st.online),
                "versions": sorted(versions.items(), key=lambda kv: (kv[0][0], -kv[0][1])),
                "alerts": alerts,
                "rollouts": self.runner.rollouts(active_only=True),
                "misbehaving": [m for m in self.service.misbehaviour(top=10) if m.total],
            }

        data = await run_in_threadpool(read)
        return self.console.render(ctx.request, "overview.html", ctx=ctx, **data)

    async def devices(self, ctx: Ctx) -> Response:
        """The device list: filtered, counted and paged in the registry."""
        shown, f, state = device_filter(ctx.request.query_params)

        def read() -> tuple[list[DeviceView], int, dict[str, dict[str, str]]]:
            views, total = self.service.device_page(f, state=state)
            ids = [v.record.id for v in views]  # one query for the page's labels
            return views, total, label_store.labels_of(self.runner.registry, ids)

        views, total, labels = await run_in_threadpool(read)
        pages = max(1, math.ceil(total / DEVICE_PAGE))
        return self.console.render(
            ctx.request,
            "devices.html" if ctx.request.headers.get("hx-request") != "true" else "_devices.html",
            ctx=ctx,
            q=shown,
            rows=[device_row(v, labels.get(v.record.id)) for v in views],
            total=total,
            pages=pages,
            states=_STATES,
        )

    async def device(self, ctx: Ctx, extra: Mapping[str, Any] | None = None) -> Response:
        """One device: reported state, telemetry charts, events, drift alerts, versions (and
        ``extra`` values for the template: labels and diagnostics)."""
        device_id = _path(ctx.request, "device_id")

        def read() -> tuple[DeviceView, Any, Any]:
            view = self.service.device(device_id)
            rows = self.service.telemetry(device_id=device_id, limit=_TELEMETRY_ROWS)
            mis = self.service.misbehaviour(device_id)
            return view, rows, mis

        view, rows, mis = await run_in_threadpool(read)
        series = device_series(r for r in rows if r.kind == "report")
        events = events_of(rows)
        reported = view.record.reported or {}
        models = reported.get("models") if isinstance(reported.get("models"), Mapping) else {}
        charts = [
            (title, series_svg(s, title=title, unit=unit))
            for title, s, unit in (
                ("Requests per report window", series.requests, ""),
                ("p99 latency", series.latency, " ms"),
                ("Rejected requests per window", series.rejects, ""),
                ("Cloud fallback rate", series.fallback, "%"),
            )
        ]
        return self.console.render(
            ctx.request,
            "device.html",
            ctx=ctx,
            d=device_row(view),
            record=view.record,
            status=None if view.online is None else view.online.to_dict(),
            desired=view.desired,
            models=[
                (clip(name, 128), flat_rows(m)) for name, m in list((models or {}).items())[:32]
            ],
            reported=flat_rows({k: v for k, v in reported.items() if k != "models"}),
            charts=charts,
            events=events[:100],
            drift_alerts=[e for e in events if e["kind"] == "drift_alert"][:50],
            misbehaviour=mis[0].to_dict() if mis and mis[0].total else None,
            **(extra or {}),
        )

    async def revoke(self, ctx: Ctx) -> WriteResult:
        """Revoke a device (``POST /v1/devices/{device_id}/revoke``)."""
        device_id = _path(ctx.request, "device_id")
        record = await run_in_threadpool(self.service.revoke_device, device_id)
        return WriteResult(
            {"id": record.id, "revoked_at": record.revoked_at and record.revoked_at.isoformat()},
            redirect=f"{PREFIX}/devices/{_quote(device_id)}",
        )


_ALERT_KINDS: Final = frozenset(
    {
        "drift_alert",
        "install_failed",
        "rolled_back",
        "probation_failed",
        "load_failed",
        "fallback_breaker_open",
        "desired_rejected",
        "transfer_failed",
        "telemetry_dropped",
    }
)


def _path(request: Request, name: str) -> str:
    value = query_text(request.path_params, name, limit=128)
    if value is None:
        raise AdminInputError(f"{name} is empty")
    return value


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
