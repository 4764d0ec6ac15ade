"""The admin HTTP API (Starlette), and the uvicorn thread that serves it next to the gateway.

Every route except ``GET /healthz`` needs a caller (``fleet_server.admin.auth``):
``Authorization: Bearer <token>`` with a per-account API token or the configured bootstrap
token, or the console's session cookie (whose writes also need its CSRF token), and a role
that holds the route's permission (``fleet_server.accounts.roles.ROUTE_PERMISSIONS``; a route
not in it is refused to everyone): else 401 ``unauthorized``, or 403 ``forbidden`` /
``csrf_failed``. The caller is ``request.state.principal`` in every handler. ``GET /metrics``
(Prometheus text format) is protected too, because it shares the admin port: give Prometheus a
viewer's token with ``authorization: {credentials_file: ...}``.
Bodies are JSON in and out (``POST /v1/models`` takes the raw bundle as
``application/octet-stream``); every request body is size-capped while it streams, and every
body, query value and path value is read through ``fleet_server.admin.body`` (strict JSON,
bounded integers, no control characters). Errors are ``{"error": message, "code":
stable_code}`` with 400 (bad input, untrusted bundle), 401, 404 (also an unknown route), 405,
403 (role), 409 (exists / revoked, a rollout command that does not fit its state), 413 (too
large) or 503
(database, bundle library or broker unavailable): the ``admin`` column of the one error table,
``fleet_server.errors.ERRORS`` (``status_of``). Messages never hold an absolute filesystem
path, and a bug answers 500 ``internal`` with no details.

Routes (v1)::

    GET  /healthz                      GET  /v1/models
    GET  /v1/status                    POST /v1/models           (bundle bytes)
    GET  /v1/devices[?group=]          POST /v1/assign  {"target","group","model","version"}
    GET  /v1/devices/{id}              POST /v1/waves            {"sha256"}
        (detail: reported, seq, status, misbehaviour, labels by source)
    POST /v1/devices                   GET  /v1/telemetry?after_id=&device_id=&limit=
    POST /v1/devices/{id}/revoke       GET  /metrics
    GET  /v1/misbehaviour[?top=]       (refusals per device, worst first)
    GET  /v1/devices?selector=|label_group=  (devices a label selector matches; labels,
                                       label groups and windows: ``fleet_server.admin.ops.labels``)
    GET  /v1/audit, /v1/audit/export   (the audit log: ``fleet_server.admin.audit_routes``)

Every authenticated request that is not a GET is recorded in the audit log by the guard (before
and after its handler runs, with the caller as its actor), so no route can forget it; a write
the role refuses is recorded too (outcome 403). Refused reads and CSRF failures are counted
(``edgefleet_admin_refused_*`` in ``/metrics``) and logged.

Owns: HTTP, JSON shapes and the error boundary (statuses come from the one error table).
Decisions live in ``fleet_server.service``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any, Final

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent.errors import EdgefleetError
from fleet_server.accounts.roles import Principal
from fleet_server.admin.audit import Auditor
from fleet_server.admin.audit_routes import audit_routes
from fleet_server.admin.auth import Authenticator, actor_of
from fleet_server.admin.body import (
    json_object,
    public_message,
    query_int,
    query_text,
    read_body,
    req_field,
)
from fleet_server.errors import (
    ADMIN_INTERNAL_STATUS,
    ADMIN_UNAUTHORIZED_STATUS,
    ERRORS,
    AdminInputError,
    CsrfError,
    ForbiddenError,
)
from fleet_server.registry.values import BundleRecord, DeviceRecord, StoredTelemetry
from fleet_server.registry.version_history import VersionHistory
from fleet_server.rollouts.label_selector import MAX_SELECTOR_CHARS, LabelSelector
from fleet_server.service import DeviceView, FleetService

__all__ = ["AdminServer", "create_app", "device_json", "model_json", "status_of"]

log = logging.getLogger(__name__)
#: Methods that change nothing: not recorded in the audit log.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Handler], Handler]
#: Adds routes to the admin app (drift, rollouts): called with the token guard.
RouteProvider = Callable[[Guard], list[Route]]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": public_message(message), "code": code}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in the API's error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else ADMIN_INTERNAL_STATUS
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    return _error(status, code, exc.detail if isinstance(exc, HTTPException) else "error")


def status_of(exc: EdgefleetError) -> int:
    """The status the admin API answers ``exc`` with: the ``admin`` column of the one error
    table (``fleet_server.errors.ERRORS``)."""
    return ERRORS.admin_status(exc)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def model_json(b: BundleRecord) -> dict[str, Any]:
    """A published bundle without its manifest summary (``list``) shape."""
    return {
        "name": b.name,
        "version": b.version,
        "channel": b.channel,
        "sha256": b.sha256,
        "length": b.length,
        "targets_sha256": b.targets_sha256,
        "published_at": _iso(b.published_at),
    }


def _record_json(r: DeviceRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "group": r.group,
        "tags": dict(r.tags),
        "enrolled_at": _iso(r.enrolled_at),
        "revoked_at": _iso(r.revoked_at),
        "cert_serial": r.cert_serial,
        "last_seen": _iso(r.last_seen),
    }


def device_json(v: DeviceView, *, detail: bool = False) -> dict[str, Any]:
    """A device with its desired models and online state (plus reported and seq in detail)."""
    out = _record_json(v.record)
    out["online"] = v.online is not None and v.online.state == "online"
    out["desired_version"] = None if v.desired is None else v.desired.version
    out["desired"] = (
        {} if v.desired is None else {n: a.to_dict() for n, a in v.desired.models.items()}
    )
    if detail:
        out["desired_expires"] = None if v.desired is None else _iso(v.desired.expires)
        out["reported"] = None if v.record.reported is None else dict(v.record.reported)
        out["reported_at"] = _iso(v.record.reported_at)
        out["status"] = None if v.online is None else v.online.to_dict()
        out["seq"] = None if v.seq is None else asdict(v.seq)
        # By source (operator, device, effective, refused); device-supplied: escape to show.
        out["labels"] = None if v.labels is None else v.labels.to_dict()
    return out


def _telemetry_json(t: StoredTelemetry) -> dict[str, Any]:
    return {
        "id": t.id,
        "device_id": t.device_id,
        "seq": t.seq,
        "kind": t.kind,
        "received_at": _iso(t.received_at),
        "payload": dict(t.payload),
    }


_METRIC_DEVICES = 20  # per-device metric labels: the worst few only (bounded cardinality)


class _FleetCollector(Collector):
    """Reads the service's status at scrape time (no state of its own)."""

    def __init__(
        self,
        service: FleetService,
        extra: tuple[tuple[str, Callable[[], Mapping[str, Any]]], ...] = (),
    ) -> None:
        self._service = service
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        for prefix, read in self._extra:  # e.g. the fallback worker's counters
            for key, value in sorted(read().items()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    yield GaugeMetricFamily(
                        f"edgefleet_{prefix}_{key}", f"{prefix} {key}.", value=value
                    )
        refusals = GaugeMetricFamily(
            "edgefleet_gateway_device_refusals",
            f"Refused messages of the {_METRIC_DEVICES} devices with the most refusals, by reason "
            "(this worker, since start; the full list: GET /v1/misbehaviour).",
            labels=["device", "reason"],
        )
        for dev in self._service.misbehaviour(top=_METRIC_DEVICES):
            for reason, n in sorted(dev.reasons.items()):
                refusals.add_metric([dev.device_id, reason], n)
        yield refusals
        st = self._service.status()
        for name, value, doc in (
            ("edgefleet_server_devices", st.devices, "Devices in the registry (incl. revoked)."),
            ("edgefleet_server_devices_active", st.active, "Devices not revoked."),
            ("edgefleet_server_devices_online", st.online, "Devices whose status is online."),
            ("edgefleet_server_bundles", st.bundles, "Published bundles."),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        # Gateway counters only grow; exposed as gauges named *_total so a gateway restart
        # that resets them is still read correctly by rate() (it treats drops as resets).
        for key, value in sorted(st.gateway.items()):
            yield GaugeMetricFamily(
                f"edgefleet_gateway_{key}", f"Gateway counter {key}.", value=value
            )


def create_app(
    service: FleetService,
    token: str | None,
    *,
    max_request_bytes: int = 1024 * 1024,
    max_upload_bytes: int = 1024 * 1024 * 1024,
    extra_routes: tuple[RouteProvider, ...] = (),
    extra_metrics: tuple[tuple[str, Callable[[], Mapping[str, Any]]], ...] = (),
    auditor: Auditor | None = None,
    authenticator: Authenticator | None = None,
) -> Starlette:
    """The admin ASGI app over ``service``, its callers checked by ``authenticator`` (by
    default one that knows only the bootstrap ``token``: no accounts).

    With ``auditor`` every authenticated request that is not a GET is recorded in the audit log
    by the guard (``fleet_server.admin.audit``: an attempt before the handler runs, refused with
    503 when it cannot be written, and the outcome after), and ``/v1/audit`` serves the log.
    The server always passes one; without it (tests of other parts) nothing is recorded.

    ``extra_routes`` add the routes of other parts (fleet drift, rollouts), each guarded by the
    same token check; ``extra_metrics`` are ``(prefix, read)`` pairs whose numeric values
    ``/metrics`` exports as ``edgefleet_<prefix>_<key>`` gauges.

    Raises:
        ValueError: ``token`` is shorter than 16 characters.
    """
    auth = authenticator if authenticator is not None else Authenticator(None, token)
    refused = {"refused_unauthenticated": 0, "refused_forbidden": 0, "refused_csrf": 0}
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(_FleetCollector(service, (*extra_metrics, ("admin", lambda: refused))))

    # Each guarded endpoint's action name ("POST /v1/devices"), filled once the routes exist.
    actions: dict[object, str] = {}

    async def answer(handler: Handler, request: Request) -> Response:
        try:
            return await handler(request)
        except EdgefleetError as exc:
            return _error(status_of(exc), exc.code, str(exc))
        except Exception:
            log.exception("admin API %s %s failed", request.method, request.url.path)
            return _error(ADMIN_INTERNAL_STATUS, "internal", "internal error (see the server log)")

    async def audited(
        handler: Handler, request: Request, audit: Auditor, action: str, who: Principal
    ) -> Response:
        try:
            pending = await audit.attempt(request, actor_of(who), action)
        except Exception as exc:  # no entry, no action: whatever the failure was
            log.exception("audit log: cannot record %s; refused", action)
            status, code = (
                (status_of(exc), exc.code)
                if isinstance(exc, EdgefleetError)
                else (ADMIN_INTERNAL_STATUS, "internal")
            )
            return _error(status, code, "the audit log cannot be written: action not run")
        refusal = pending.refusal
        if refusal is not None:
            response: Response = _error(status_of(refusal), refusal.code, str(refusal))
        else:
            response = await answer(handler, pending.request)
        try:
            await audit.outcome(pending, response)
        except Exception:
            # The action ran and its attempt is recorded: answer what happened.
            log.exception("audit log: outcome of %s (%s) not recorded", action, pending.entry.id)
        return response

    def refuse(request: Request, what: str, counter: str) -> None:
        refused[counter] += 1
        if counter == "refused_unauthenticated" and request.method in SAFE_METHODS:
            return  # counted only: e.g. a scraper without its token would flood the log
        log.warning(
            "admin API: %s %s from %s refused: %s",
            request.method,
            request.url.path[:200],
            request.client.host if request.client else "?",
            what,
        )

    def guarded(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            action = actions.get(request.scope.get("endpoint"), f"{request.method} ?")
            try:
                who = await auth.principal(request)
            except CsrfError as exc:
                refuse(request, "CSRF token missing or wrong", "refused_csrf")
                return _error(status_of(exc), exc.code, str(exc))
            except EdgefleetError as exc:  # the database: cannot tell who it is
                return _error(status_of(exc), exc.code, str(exc))
            if who is None:
                refuse(request, "not authenticated", "refused_unauthenticated")
                return _error(
                    ADMIN_UNAUTHORIZED_STATUS, "unauthorized", "missing or wrong bearer token"
                )
            request.state.principal = who
            try:
                auth.authorize(who, action)
            except ForbiddenError as exc:
                refuse(request, f"{who.via}:{who.account[:64]} ({who.role})", "refused_forbidden")
                denial = exc

                async def deny(_: Request) -> Response:
                    return _error(status_of(denial), denial.code, str(denial))

                handler_or_denial: Handler = deny
            else:
                handler_or_denial = handler
            if auditor is None or request.method in SAFE_METHODS:
                return await answer(handler_or_denial, request)
            return await audited(handler_or_denial, request, auditor, action, who)

        return run

    async def json_body(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, max_request_bytes))

    def path_id(request: Request, name: str) -> str:
        value = query_text(request.path_params, name)
        if value is None:
            raise AdminInputError(f"{name} is empty")
        return value

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def status(request: Request) -> Response:
        st = await run_in_threadpool(service.status)
        return JSONResponse(asdict(st))

    async def list_devices(request: Request) -> Response:
        params = request.query_params
        text = query_text(params, "selector", limit=MAX_SELECTOR_CHARS)
        selector = None if text is None else LabelSelector.parse(text)
        label_group = query_text(params, "label_group", limit=64)
        views = await run_in_threadpool(
            lambda: service.devices(
                query_text(params, "group"), selector=selector, label_group=label_group
            )
        )
        return JSONResponse({"devices": [device_json(v) for v in views]})

    async def show_device(request: Request) -> Response:
        device_id = path_id(request, "device_id")
        view = await run_in_threadpool(service.device, device_id)
        out = device_json(view, detail=True)
        mis = service.misbehaviour(device_id)
        out["misbehaviour"] = mis[0].to_dict() if mis else None
        return JSONResponse(out)

    async def misbehaving_devices(request: Request) -> Response:
        top = query_int(request.query_params, "top", 20, lo=1, hi=10_000)
        rows = await run_in_threadpool(lambda: service.misbehaviour(top=top))
        return JSONResponse({"devices": [m.to_dict() for m in rows if m.total]})

    async def register_device(request: Request) -> Response:
        data = await json_body(request)
        device_id = req_field(data, "id", str, limit=128)
        group = req_field(data, "group", str, "default", limit=128)
        tags = req_field(data, "tags", dict, {})
        serial = req_field(data, "cert_serial", str, None) if data.get("cert_serial") else None
        record = await run_in_threadpool(
            lambda: service.enroll_device(device_id, group=group, tags=tags, cert_serial=serial)
        )
        return JSONResponse(_record_json(record), status_code=201)

    async def revoke_device(request: Request) -> Response:
        record = await run_in_threadpool(service.revoke_device, path_id(request, "device_id"))
        return JSONResponse(_record_json(record))

    async def list_models(request: Request) -> Response:
        name = query_text(request.query_params, "name")
        models, past = await run_in_threadpool(
            lambda: (service.list_models(name), service.model_history(name))
        )
        # Each version's aborts, quarantine and overrides (memory of failure) beside it.
        return JSONResponse(
            {
                "models": [
                    {
                        **model_json(b),
                        "history": (
                            past.get((b.name, b.version)) or VersionHistory(b.name, b.version)
                        ).to_dict(),
                    }
                    for b in models
                ]
            }
        )

    async def publish_model(request: Request) -> Response:
        data = await read_body(request, max_upload_bytes)
        record = await run_in_threadpool(service.publish_model_bytes, data)
        return JSONResponse(model_json(record), status_code=201)

    async def assign(request: Request) -> Response:
        data = await json_body(request)
        target = req_field(data, "target", str, limit=128)
        group = req_field(data, "group", bool, False)
        model = req_field(data, "model", str, limit=128)
        version = req_field(data, "version", int, lo=1)
        override_quarantine = req_field(data, "override_quarantine", str, "", limit=512)
        override_aborted = req_field(data, "override_aborted", str, "", limit=512)
        results = await run_in_threadpool(
            lambda: service.operator_assign(
                target,
                model,
                version,
                group=group,
                override_quarantine=override_quarantine,
                override_aborted=override_aborted,
            )
        )
        return JSONResponse({"results": [asdict(r) for r in results]})

    async def start_wave(request: Request) -> Response:
        sha256 = req_field(await json_body(request), "sha256", str, limit=64)
        wave = await run_in_threadpool(service.start_wave, sha256)
        return JSONResponse({"wave": wave, "sha256": sha256}, status_code=202)

    async def telemetry(request: Request) -> Response:
        # Without after_id: the newest entries (a tail), not the oldest ones.
        after_id = (
            query_int(request.query_params, "after_id", 0)
            if "after_id" in request.query_params
            else None
        )
        limit = query_int(request.query_params, "limit", 100, lo=1, hi=10_000)
        device = query_text(request.query_params, "device_id", limit=128)
        rows = await run_in_threadpool(
            lambda: service.telemetry(after_id=after_id, device_id=device, limit=limit)
        )
        return JSONResponse({"telemetry": [_telemetry_json(t) for t in rows]})

    async def prometheus(request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, metrics)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", guarded(prometheus), methods=["GET"]),
        Route("/v1/status", guarded(status), methods=["GET"]),
        Route("/v1/devices", guarded(list_devices), methods=["GET"]),
        Route("/v1/devices", guarded(register_device), methods=["POST"]),
        Route("/v1/devices/{device_id}", guarded(show_device), methods=["GET"]),
        Route("/v1/misbehaviour", guarded(misbehaving_devices), methods=["GET"]),
        Route("/v1/devices/{device_id}/revoke", guarded(revoke_device), methods=["POST"]),
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models", guarded(publish_model), methods=["POST"]),
        Route("/v1/assign", guarded(assign), methods=["POST"]),
        Route("/v1/waves", guarded(start_wave), methods=["POST"]),
        Route("/v1/telemetry", guarded(telemetry), methods=["GET"]),
    ]
    for provide in extra_routes:
        routes += provide(guarded)
    if auditor is not None:
        routes += audit_routes(auditor.registry, guarded)
    for route in routes:
        methods = sorted(set(route.methods or ()) - {"HEAD"})
        actions[route.endpoint] = f"{'/'.join(methods)} {route.path}"
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


class AdminServer:
    """Runs an ASGI app with uvicorn in a background thread (``start``/``stop``)."""

    #: The thread's name and what a failed start says (subclasses serve other apps).
    thread_name = "admin-api"
    not_started = "the admin API did not start listening (port in use?)"

    def __init__(self, app: Starlette, host: str, port: int, **uvicorn_options: Any) -> None:
        """Prepare the server; ``port`` 0 picks a free port (see ``port`` after ``start``).
        ``uvicorn_options`` go to ``uvicorn.Config`` as they are (TLS files, shutdown)."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            **uvicorn_options,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        sockets = self._server.servers[0].sockets if self._server.servers else []
        return int(sockets[0].getsockname()[1]) if sockets else 0

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a daemon thread; return once listening.

        Raises:
            OSError: the server did not start listening (port taken, bad address).
        """
        self._thread = threading.Thread(target=self._server.run, name=self.thread_name, daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self._server.started:
            self.stop()
            raise OSError(self.not_started)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, join the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
