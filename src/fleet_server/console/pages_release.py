"""Console pages of releases: models (versions, provenance, quantization report, quality
comparisons, abort and quarantine history, field accuracy from ground truth) and rollouts
(list, the policy form with ``RolloutPolicy``'s defaults, the live view ``fleet-server
rollouts watch`` gives, polled by htmx, and the approve/pause/resume/abort commands).

Writes call what the admin API's rollout routes call: ``RolloutRunner.create`` and its
commands; ``admin.rollouts.rollout_status`` builds the live view's data as it builds
``GET /v1/rollouts/{id}``. Owns: form parsing and rendering. Does not own the session, role
and audit checks (``fleet_server.console.web``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fleet_server.admin.accuracy import MAX_HOURS
from fleet_server.admin.body import MAX_ID, query_int, query_text
from fleet_server.admin.rollouts import COMMANDS, rollout_status
from fleet_server.console.charts import series_svg
from fleet_server.console.shaping import clip, flat_rows, gate_history, policy_fields
from fleet_server.console.shaping import policy_from_form as _policy_from_form
from fleet_server.console.web import PREFIX, Console, Ctx, WriteResult
from fleet_server.errors import NotFoundError, RolloutPolicyError
from fleet_server.history.accuracy import model_accuracy
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import rollouts as store
from fleet_server.registry.rollouts import rollout_to_dict
from fleet_server.registry.version_history import VersionHistory
from fleet_server.rollouts.admission import MAX_OVERRIDE_REASON
from fleet_server.rollouts.policy import ON_BREACH, RolloutPolicy, Selector
from fleet_server.service import FleetService

__all__ = ["FINAL_STATES", "ReleasePages", "create_body"]

FINAL_STATES: Final = frozenset({"completed", "aborted"})
_OVERRIDES: Final = ("override_quarantine", "override_aborted", "override_offline")


def _text(form: Mapping[str, str], name: str, *, required: bool = True) -> str | None:
    value = form.get(name, "").strip()
    if not value:
        if required:
            raise RolloutPolicyError(f"{name} is required")
        return None
    if len(value) > 128 or not value.isprintable():
        raise RolloutPolicyError(f"{name} must be printable text of at most 128 characters")
    return value


def _int(form: Mapping[str, str], name: str, lo: int) -> int | None:
    raw = form.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= MAX_ID:
        raise RolloutPolicyError(f"{name} must be an integer in {lo}..{MAX_ID}")
    return int(raw)


def create_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/rollouts`` body the create form describes.

    Raises:
        RolloutPolicyError: a missing or malformed field (the message names it).
    """
    model = _text(form, "model")
    version = _int(form, "version", 1)
    if version is None:
        raise RolloutPolicyError("version is required")
    target = form.get("target", "group")
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "from_version": _int(form, "from_version", 0),
        "policy": _policy_from_form(form),
    }
    if target == "tag":
        key, _, value = (form.get("selector", "")).partition("=")
        if not key or not value or len(key) > 128 or len(value) > 128:
            raise RolloutPolicyError("select devices by tag as key=value")
        body["tags"] = {key: value}
    else:
        body["group"] = _text(form, "selector")
    for key in _OVERRIDES:
        reason = form.get(key, "").strip()
        if len(reason) > MAX_OVERRIDE_REASON:
            raise RolloutPolicyError(f"{key} is longer than {MAX_OVERRIDE_REASON} characters")
        if reason:
            body[key] = reason
    return body


class ReleasePages:
    """Model and rollout pages over ``service`` and ``runner``."""

    def __init__(
        self,
        console: Console,
        service: FleetService,
        runner: RolloutRunner,
        now: Callable[[], datetime],
    ) -> None:
        """Serve the pages through ``console``; ``now`` is the server's clock."""
        self.console = console
        self.service = service
        self.runner = runner
        self.now = now

    async def models(self, ctx: Ctx) -> Response:
        """Every published version with provenance, report and history of failure."""

        def read() -> list[dict[str, Any]]:
            bundles = self.service.list_models()
            history = self.service.model_history()
            rollouts = self.runner.rollouts()
            out = []
            for b in reversed(bundles[-200:]):
                h = history.get((b.name, b.version)) or VersionHistory(b.name, b.version)
                mine = [r for r in rollouts if r.model == b.name and r.to_version == b.version]
                out.append(
                    {
                        "b": b,
                        "history": h.to_dict(),
                        "provenance": flat_rows(b.manifest.get("provenance")),
                        "report": flat_rows(b.manifest.get("report")),
                        "rollouts": [
                            {
                                "id": r.id,
                                "state": r.state,
                                "from_version": r.from_version,
                                "offline": None
                                if r.offline is None
                                else flat_rows(r.offline.to_dict()),
                            }
                            for r in mine[-10:]
                        ],
                    }
                )
            return out

        rows = await run_in_threadpool(read)
        return self.console.render(ctx.request, "models.html", ctx=ctx, models=rows)

    async def accuracy(self, ctx: Ctx) -> Response:
        """Field accuracy from ground truth per version and group (``GET
        /v1/models/{name}/accuracy``'s data) over the last ``hours``."""
        name = query_text(ctx.request.path_params, "name", limit=128) or ""
        hours = query_int(ctx.request.query_params, "hours", 24, lo=1, hi=MAX_HOURS)

        def read() -> dict[str, Any]:
            if not name or not self.runner.registry.list_bundles(name):
                raise NotFoundError(f"no published model {name!r}")
            since = self.now() - timedelta(hours=hours)
            return model_accuracy(self.runner.registry, name, since)

        doc = await run_in_threadpool(read)
        return self.console.render(
            ctx.request, "accuracy.html", ctx=ctx, name=name, hours=hours, doc=doc
        )

    async def rollouts(self, ctx: Ctx) -> Response:
        """Every rollout, newest first, and the create form with the policy's defaults."""
        rows = await run_in_threadpool(self.runner.rollouts)
        models = await run_in_threadpool(self.service.list_models)
        fields = policy_fields()
        return self.console.render(
            ctx.request,
            "rollouts.html",
            ctx=ctx,
            rollouts=sorted(rows, key=lambda r: r.created_at, reverse=True)[:200],
            options=[f for f in fields if not f.name.startswith("thresholds.")],
            gates=[f for f in fields if f.name.startswith("thresholds.")],
            on_breach=ON_BREACH,
            models=sorted({b.name for b in models}),
            defaults=RolloutPolicy(),
        )

    async def _live(self, rollout_id: str) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            r = self.runner.get(rollout_id)
            out = rollout_status(self.runner, r, events=False)
            events = [
                {"at": e.at.isoformat(), "kind": e.kind, "detail": dict(e.detail)}
                for e in store.rollout_events(self.runner.registry, r.id, limit=200)
            ]
            out["events"] = events
            return out

        r = await run_in_threadpool(read)
        history = gate_history(r["events"])
        sizes = list(r.get("wave_sizes") or [])
        states = sorted(r["devices"].items())
        return {
            "r": r,
            "final": r["state"] in FINAL_STATES,
            "waves": [(i + 1, size, i < r["wave"], i == r["wave"]) for i, size in enumerate(sizes)],
            "device_states": [(clip(d, 128), s) for d, s in states[:500]],
            "more_devices": max(0, len(states) - 500),
            "gate_charts": [
                (f"{name}: measured vs threshold", series_svg(pair, title=name))
                for name, pair in history.items()
            ],
            # The gates are charted above: the log shows what was decided and why.
            "decisions": [
                {
                    **e,
                    "detail_rows": flat_rows(
                        {k: v for k, v in e["detail"].items() if k not in ("gates", "reasons")}
                    ),
                    "reasons": [clip(x) for x in e["detail"].get("reasons") or []][:20],
                }
                for e in reversed(r["events"][-50:])
            ],
        }

    async def rollout(self, ctx: Ctx) -> Response:
        """The live view; with htmx, only its body (polled every 2 s until final)."""
        rollout_id = _rollout_id(ctx.request)
        data = await self._live(rollout_id)
        fragment = ctx.request.headers.get("hx-request") == "true"
        return self.console.render(
            ctx.request,
            "_rollout_live.html" if fragment else "rollout.html",
            ctx=ctx,
            commands=COMMANDS,
            **data,
        )

    async def create(self, ctx: Ctx) -> WriteResult:
        """``POST /v1/rollouts`` from the form."""
        body = create_body(ctx.form)
        try:
            policy = RolloutPolicy.from_dict(body["policy"])
        except (TypeError, ValueError, OverflowError, ArithmeticError) as exc:
            raise RolloutPolicyError(f"invalid policy: {type(exc).__name__}: {exc}") from exc
        selector = Selector(group=body.get("group"), tags=body.get("tags") or {})
        r = await run_in_threadpool(
            lambda: self.runner.create(
                body["model"],
                body["version"],
                selector=selector,
                policy=policy,
                from_version=body["from_version"],
                override_quarantine=body.get("override_quarantine", ""),
                override_aborted=body.get("override_aborted", ""),
                override_offline=body.get("override_offline", ""),
            )
        )
        return WriteResult(rollout_to_dict(r), redirect=f"{PREFIX}/rollouts/{r.id}", status=201)

    def command(self, name: str) -> Any:
        """The handler of ``POST /v1/rollouts/{rollout_id}/<name>``."""

        async def run(ctx: Ctx) -> WriteResult:
            rollout_id = _rollout_id(ctx.request)
            r = await run_in_threadpool(getattr(self.runner, name), rollout_id)
            fragment = None
            if ctx.request.headers.get("hx-request") == "true":  # inline: the live view
                data = await self._live(rollout_id)
                fragment = self.console.render(
                    ctx.request, "_rollout_live.html", ctx=ctx, commands=COMMANDS, **data
                )
            return WriteResult(
                rollout_to_dict(r), redirect=f"{PREFIX}/rollouts/{r.id}", fragment=fragment
            )

        return run


def _rollout_id(request: Request) -> str:
    value = query_text(request.path_params, "rollout_id", limit=128)
    if value is None:
        raise RolloutPolicyError("rollout id is empty")
    return value
