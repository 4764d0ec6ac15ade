"""Labelled accuracy per model version and cohort on the server, from stored reports.

Devices in two groups report cumulative confusion counts for the version they serve; the server
differences them per report interval, merges them exactly per version over the fleet and per
group, and shows each with a 95 % Wilson interval: ``model_accuracy``, ``GET
/v1/models/{name}/accuracy`` and ``fleet-server models accuracy NAME``. Counts folded into
history rollups and those still raw add up to the same totals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from clock import FakeClock
from edge_agent.errors import EdgefleetError
from edge_agent.quality.confusion import Confusion, wilson_interval
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from edge_agent.wire.telemetry_ground_truth import GroundTruthStats
from fleet_server.admin import client as admin_client
from fleet_server.admin.accuracy import Handler, accuracy_routes
from fleet_server.admin.api import status_of
from fleet_server.cli import admin as cli_admin
from fleet_server.history.accuracy import model_accuracy
from fleet_server.jobs.history import HistoryJob, HistoryPolicy
from fleet_server.registry.store import Registry

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def diag(right: int, wrong: int) -> Confusion:
    """Three classes: ``right`` correct answers on class 0, ``wrong`` 1s answered as 2s."""
    return Confusion(((right, 0, 0), (0, 0, wrong), (0, 0, 0)))


# device -> (group, version, labels added per report)
FLEET = {
    "a-1": ("line-a", 1, diag(50, 1)),
    "a-2": ("line-a", 1, diag(48, 2)),
    "b-1": ("line-b", 1, diag(40, 0)),
    "b-2": ("line-b", 2, diag(30, 10)),  # a worse candidate on one device
}


@pytest.fixture
def registry(registry_url: str) -> Iterator[tuple[Registry, FakeClock]]:
    clock = FakeClock(wall=T0)
    reg = Registry.open(registry_url, clock=clock.wall)
    reg.upgrade()
    for d, (group, _v, _c) in FLEET.items():
        reg.enroll(d, group=group)
    for v in (1, 2):
        reg.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64, length=10,
                           targets_sha256=f"{v + 2}" * 64)  # fmt: skip
    yield reg, clock
    reg.engine.dispose()


def send(reg: Registry, clock: FakeClock, reports: int, start: int = 0) -> None:
    """Each device sends ``reports`` reports 10 minutes apart, its counts growing each time."""
    for i in range(start, start + reports):
        for d, (_g, version, per) in FLEET.items():
            total = Confusion.total([per] * i, 3)
            gt = GroundTruthStats({"counted": total.n}, {version: total}) if i else None
            stats = ModelStats(version=version, outcomes={"ok": 10 * i, "error": 0, "rejected": 0},
                               ground_truth=gt)  # fmt: skip
            r = TelemetryReport(d, i + 1, 0.0, 1.0, started_at=1.0, models={"digits": stats})
            reg.ingest(d, [r])
        clock.advance(600)


def expected(version: int, reports: int, group: str | None = None) -> Confusion:
    parts = [
        per
        for _d, (g, v, per) in FLEET.items()
        if v == version and (group is None or g == group)
        for _ in range(reports - 1)
    ]
    return Confusion.total(parts, 3)


def check(doc: dict[str, Any], reports: int) -> None:
    versions = {v["version"]: v for v in doc["versions"]}
    assert list(versions) == [2, 1]
    for version in (1, 2):
        want = expected(version, reports)
        fleet = versions[version]["fleet"]
        assert (fleet["n"], fleet["correct"]) == (want.n, want.correct)
        assert (fleet["low"], fleet["high"]) == pytest.approx(wilson_interval(want.correct, want.n))
        assert fleet["flips"] == [[1, 2, want.counts[1][2]]]
    groups = versions[1]["groups"]
    assert set(groups) == {"line-a", "line-b"}
    assert groups["line-b"]["n"] == expected(1, reports, "line-b").n
    assert groups["line-b"]["accuracy"] == 1.0
    assert set(versions[2]["groups"]) == {"line-b"}


def test_merged_accuracy_per_version_and_group(registry: tuple[Registry, FakeClock]) -> None:
    reg, clock = registry
    send(reg, clock, 4)
    doc = model_accuracy(reg, "digits", T0 - timedelta(hours=1))
    check(doc, 4)
    v2 = {v["version"]: v for v in doc["versions"]}[2]["fleet"]
    assert v2["accuracy"] == pytest.approx(90 / 120)
    assert v2["low"] < 0.75 < v2["high"]
    # The window starts later: only the later intervals count.
    later = model_accuracy(reg, "digits", T0 + timedelta(minutes=15))
    assert {v["version"]: v for v in later["versions"]}[2]["fleet"]["n"] == 2 * 40


def test_rollups_and_raw_rows_add_up_to_the_same_totals(
    registry: tuple[Registry, FakeClock],
) -> None:
    reg, clock = registry
    send(reg, clock, 8)
    policy = HistoryPolicy(grace_seconds=0.0)
    job = HistoryJob(reg, policy, clock=clock.wall)
    job.run_once()
    assert job.folded_until(300) is not None
    check(model_accuracy(reg, "digits", T0 - timedelta(hours=1)), 8)


def _guarded(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except EdgefleetError as exc:
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=status_of(exc))

    return run


def test_admin_route_and_cli(
    registry: tuple[Registry, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, clock = registry
    send(reg, clock, 3)
    app = Starlette(routes=accuracy_routes(reg, clock.wall, _guarded))
    with TestClient(app) as api:
        check(api.get("/v1/models/digits/accuracy", params={"hours": 2}).json(), 3)
        assert api.get("/v1/models/nope/accuracy").status_code == 404
        assert api.get("/v1/models/digits/accuracy", params={"hours": 0}).status_code == 400
        assert api.get("/v1/models/digits/accuracy", params={"hours": "x"}).status_code == 400
        transport = api._transport

        def client(url: str, token: str) -> admin_client.AdminClient:
            return admin_client.AdminClient(url, token, transport=transport)

        monkeypatch.setattr(cli_admin, "AdminClient", client)

        @click.group()
        def main() -> None:
            pass

        @main.group()
        def devices() -> None:
            pass

        cli_admin.register_admin_commands(main, devices)
        args = ["models", "accuracy", "digits", "--url", "http://testserver", "--token", "t"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output + repr(res.exception)
        lines = res.output.splitlines()
        assert any(line.split()[:3] == ["v2", "fleet", "75.0%"] for line in lines), res.output
        assert any(line.split()[:3] == ["v1", "line-b", "100.0%"] for line in lines), res.output
        assert any("1->2 x20" in line for line in lines), res.output
        res = CliRunner().invoke(main, [*args, "--json"])
        check(json.loads(res.output), 3)
