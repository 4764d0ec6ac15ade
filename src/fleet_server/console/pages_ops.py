"""Console pages of operations: fleet drift (per-feature charts by cohort and version), cloud
fallback (rates, circuit breakers, disagreement) and the audit log (filter, export links).

Drift is ``DriftService.report`` with the query ``admin.drift.drift_query`` parses for
``GET /v1/drift``, charted with the panels of the drift HTML report
(``drift.report.chart_panels``). The audit log is read with ``admin.audit_routes.audit_query``
as ``GET /v1/audit`` reads it; its export links are that route's ``/v1/audit/export`` (the
browser's session cookie authenticates a GET there). Owns: rendering. Does not own the
session checks (``fleet_server.console.web``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from fleet_server.admin.audit_routes import audit_query
from fleet_server.admin.body import query_int
from fleet_server.admin.drift import drift_query
from fleet_server.console.charts import bars_svg
from fleet_server.console.shaping import fallback_summary
from fleet_server.console.web import Console, Ctx
from fleet_server.drift.report import chart_panels
from fleet_server.drift.service import DriftService
from fleet_server.registry.audit import audit_entries
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

__all__ = ["AUDIT_PAGE", "OpsPages"]

AUDIT_PAGE: Final = 100
_FALLBACK_ROWS: Final = 2000
_AUDIT_FILTERS: Final = ("since", "until", "actor", "action", "object")


class OpsPages:
    """Drift, fallback and audit pages."""

    def __init__(
        self,
        console: Console,
        service: FleetService,
        drift: DriftService,
        registry: Registry,
        fallback_stats: Callable[[], Mapping[str, Any]] | None,
    ) -> None:
        """Serve the pages through ``console``; ``fallback_stats`` is the server's fallback
        worker's counters (``None``: fallback is not served here)."""
        self.console = console
        self.service = service
        self.drift = drift
        self.registry = registry
        self.fallback_stats = fallback_stats

    async def drift_page(self, ctx: Ctx) -> Response:
        """The drift form; with a model, its cohorts' charts for one feature of one tensor."""
        params = dict(ctx.request.query_params)
        params.setdefault("since", "24h")
        models = await run_in_threadpool(self.service.list_models)
        names = sorted({b.name for b in models})
        out: dict[str, Any] = {"names": names, "params": params, "report": None}
        if params.get("model"):
            query, _ = drift_query(params, self.drift)
            feature = query_int(params, "feature", 0, lo=0, hi=4096)
            result = await run_in_threadpool(self.drift.report, query)
            report = result.to_dict(include_views=True)
            tensors = sorted({str(c["tensor"]) for c in report["cohorts"]})
            tensor = params.get("tensor") if params.get("tensor") in tensors else None
            charts = []
            if report["cohorts"]:
                panels = chart_panels(report, feature, tensor)
                charts = [
                    {
                        "title": p.cohort,
                        "svg": bars_svg(p, title=f"{p.cohort}: feature {feature}"),
                        "scores": p.scores,
                        "labels": list(enumerate(p.labels)),
                    }
                    for p in panels
                ]
            out.update(
                report=report,
                tensors=tensors,
                feature=feature,
                charts=charts,
                cohorts=[{k: v for k, v in c.items() if k != "view"} for c in report["cohorts"]],
            )
        return self.console.render(ctx.request, "drift.html", ctx=ctx, **out)

    async def fallback(self, ctx: Ctx) -> Response:
        """Fallback rates from recent reports, breaker states from events, server counters."""
        rows = await run_in_threadpool(lambda: self.service.telemetry(limit=_FALLBACK_ROWS))
        summary = fallback_summary(rows)
        stats = dict(self.fallback_stats()) if self.fallback_stats is not None else None
        disagreement = None
        if stats and stats.get("compared_rows"):
            disagreement = stats.get("disagree_rows", 0) / stats["compared_rows"]
        return self.console.render(
            ctx.request,
            "fallback.html",
            ctx=ctx,
            summary=summary,
            stats=sorted(stats.items()) if stats is not None else None,
            disagreement=disagreement,
            rows=_FALLBACK_ROWS,
        )

    async def audit(self, ctx: Ctx) -> Response:
        """The newest ``AUDIT_PAGE`` entries that match the filter (narrow it by time to see
        older ones) and export links with the same filter for the whole log."""
        params = {k: v for k, v in ctx.request.query_params.items() if k in _AUDIT_FILTERS and v}
        query = audit_query(params, limit=AUDIT_PAGE, after_id=None)
        entries = await run_in_threadpool(audit_entries, self.registry, query)
        return self.console.render(
            ctx.request,
            "audit.html",
            ctx=ctx,
            entries=entries,
            params=params,
            export_json=f"/v1/audit/export?{urlencode({**params, 'format': 'json'})}",
            export_csv=f"/v1/audit/export?{urlencode({**params, 'format': 'csv'})}",
            page_size=AUDIT_PAGE,
        )
