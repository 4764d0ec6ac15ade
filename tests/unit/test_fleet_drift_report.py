"""Fleet drift HTML/PNG report, the ``drift report`` CLI (fake client) and the admin route."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from edge_agent.drift import TierASketch, build_baseline
from edge_agent.errors import EdgefleetError
from fleet_server.admin.drift import drift_routes
from fleet_server.cli.drift import register_drift_commands
from fleet_server.drift.cohorts import CohortSpec, DeviceInfo, FleetWindow
from fleet_server.drift.fleet import FleetAccumulator, score_fleet
from fleet_server.drift.report import render_html, render_png
from fleet_server.drift.service import DriftService
from fleet_server.errors import FleetDriftError, NotFoundError
from fleet_server.registry.store import Registry

F = 4


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    base = build_baseline({"x": np.random.default_rng(1).normal(size=(3000, F))}, {}).view("x")
    acc = FleetAccumulator(CohortSpec("group"))
    rng = np.random.default_rng(2)
    for i in range(8):
        sketch = TierASketch.zero(base.edges)
        sketch.update(rng.normal(size=(400, F)) + (np.array([0, 1.0, 0, 0]) if i < 4 else 0))
        acc.add(FleetWindow(f"d{i}", "m", 3, "x", "input", 0.0, sketch.view()),
                DeviceInfo("hot" if i < 4 else "cold"), base)  # fmt: skip
    cells, devices = acc.merged()
    result = score_fleet(cells, {("m", 3, "x", "input"): base}, spec=CohortSpec("group"),
                         device_cells=devices)  # fmt: skip
    return json.loads(json.dumps(result.to_dict(include_views=True)))


def test_html_report_shows_bars_per_cohort_and_the_drifted_table(report: dict[str, Any]) -> None:
    page = render_html(report, 1)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert "src=" not in page
    assert "href=" not in page  # self-contained: nothing is fetched
    assert page.count("<svg") == 3  # fleet, hot, cold
    for cohort in ("* (v3)", "hot (v3)", "cold (v3)"):
        assert cohort in page
    assert "rgb(214, 39, 40)" in page  # a drifted cohort is drawn red
    drifted = page.split("<h2>Drifted features</h2>")[1]
    assert "<td>1</td><td>-</td><td>*, hot</td>" in drifted
    assert "d0" in drifted
    assert "d5" not in drifted


def test_png_is_a_valid_rgb_image_with_one_panel_per_cohort(report: dict[str, Any]) -> None:
    png = render_png(report, 1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (640, 360)
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    assert len(raw) == height * (1 + width * 3)
    assert bytes((214, 39, 40)) in raw
    assert bytes((160, 160, 160)) in raw


@pytest.mark.parametrize(("feature", "tensor"), [(F, None), (0, "nope")])
def test_charts_refuse_missing_features_and_tensors(
    report: dict[str, Any], feature: int, tensor: str | None
) -> None:
    with pytest.raises(FleetDriftError):
        render_html(report, feature, tensor)


def test_charts_need_views(report: dict[str, Any]) -> None:
    slim = {k: v for k, v in report.items() if k != "baselines"}
    with pytest.raises(FleetDriftError):
        render_png(slim, 0)


class FakeClient:
    def __init__(self, body: dict[str, Any], calls: list[dict[str, Any]]) -> None:
        self.body, self.calls = body, calls

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def drift(self, model: str, **kw: Any) -> dict[str, Any]:
        self.calls.append({"model": model, **kw})
        return self.body


def _cli(body: dict[str, Any], calls: list[dict[str, Any]]) -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    register_drift_commands(cli, lambda url, token: FakeClient(body, calls))
    return cli


def test_cli_prints_drifted_features_per_cohort(report: dict[str, Any]) -> None:
    calls: list[dict[str, Any]] = []
    out = CliRunner().invoke(
        _cli(report, calls),
        [
            "drift",
            "report",
            "m",
            "--token",
            "t" * 16,
            "--by",
            "group",
            "--since",
            "24h",
            "--version",
            "3",
        ],
    )
    assert out.exit_code == 0, out.output
    assert calls == [{"model": "m", "version": 3, "by": "group", "since": "24h", "until": None,
                      "bucket": None, "views": False, "devices": True}]  # fmt: skip
    lines = out.output.splitlines()
    assert lines[1].split()[:4] == ["COHORT", "VERSION", "TENSOR", "FEATURE"]
    assert {tuple(line.split()[:4]) for line in lines[2:] if not line.startswith("device")} == {
        ("*", "v3", "input:x", "1"),
        ("hot", "v3", "input:x", "1"),
    }
    assert any(line.startswith("device d0: input:x v3 features [1]") for line in lines)


def test_cli_writes_charts_and_json(report: dict[str, Any], tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    args = ["drift", "report", "m", "--token", "t" * 16, "--feature", "1", "--json",
            "--html", str(tmp_path / "r.html"), "--png", str(tmp_path / "r.png")]  # fmt: skip
    out = CliRunner().invoke(_cli(report, calls), args)
    assert out.exit_code == 0, out.output
    assert calls[0]["views"] is True
    assert json.loads(out.output)["by"] == "group"
    assert "<svg" in (tmp_path / "r.html").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_chart_needs_a_feature(report: dict[str, Any], tmp_path: Path) -> None:
    out = CliRunner().invoke(
        _cli(report, []),
        ["drift", "report", "m", "--token", "t" * 16, "--html", str(tmp_path / "x.html")],
    )
    assert out.exit_code == 2
    assert "--feature" in out.output


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """The admin app's error mapping, reduced to what the drift route raises."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except EdgefleetError as exc:
            status = 404 if isinstance(exc, NotFoundError) else 400
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=status)

    return run


def test_admin_route(tmp_path: Path) -> None:
    registry = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    registry.upgrade()
    service = DriftService(registry, tmp_path, clock=lambda: datetime(2026, 6, 1, tzinfo=UTC))
    client = TestClient(Starlette(routes=drift_routes(service, _guarded)))
    ok = client.get(
        "/v1/drift", params={"model": "m", "by": "tag:site", "since": "2h", "bucket": "1h"}
    )
    assert ok.status_code == 200
    assert ok.json() == {"by": "tag:site", "cohorts": [], "drifted": [], "device_alerts": [],
                         "devices_scored": 0, "skipped": {}}  # fmt: skip
    for params, status, code in (
        ({}, 400, "fleet_drift"),
        ({"model": "m", "by": "rack"}, 400, "fleet_drift"),
        ({"model": "m", "since": "soon"}, 400, "fleet_drift"),
        ({"model": "m", "version": "x"}, 400, "fleet_drift"),
        ({"model": "m", "version": "2"}, 404, "model_unknown"),
    ):
        bad = client.get("/v1/drift", params=params)
        assert (bad.status_code, bad.json()["code"]) == (status, code)
    registry.close()
