"""The audit log on real SQLite and real PostgreSQL: admin actions through a real HTTP server
are read back through the API and the ``fleet-server audit`` commands, and PostgreSQL itself
refuses to change or delete an entry."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bundles import DigitsBundles
from fakes import FakeGateway
from fleet_server.admin.api import AdminServer, create_app
from fleet_server.admin.audit import Auditor
from fleet_server.cli.main import cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from pg import PgCluster

BIN = Path(sys.executable).parent / "fleet-server"
TOKEN = "a" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def _serve(
    registry_url: str, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[str, Registry]]:
    """The admin API with an auditor over a fresh registry, served on a loopback port."""
    registry = Registry.open(registry_url)
    registry.upgrade()
    keys = digits_bundles.keys
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    app = create_app(
        service,
        TOKEN,
        auditor=Auditor(registry, lambda: datetime.now(UTC), max_body_bytes=1024 * 1024),
    )
    server = AdminServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", registry
    finally:
        server.stop()
        registry.close()


@pytest.fixture
def served(
    registry_url: str, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[str, Registry]]:
    """``_serve`` on each backend."""
    with _serve(registry_url, digits_bundles, tmp_path) as out:
        yield out


@pytest.fixture
def served_pg(
    pg: PgCluster, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[str, Registry]]:
    """``_serve`` on PostgreSQL only (SQLite has no roles: the code is its only guard)."""
    with _serve(pg.new_database(), digits_bundles, tmp_path) as out:
        yield out


def test_actions_are_recorded_and_read_back(
    served: tuple[str, Registry], digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    url, _ = served
    hostile = '=HYPERLINK("http://x")'
    with httpx.Client(base_url=url, headers=AUTH) as http:
        assert http.post("/v1/devices", json={"id": "cam-1", "group": hostile}).status_code == 201
        assert http.post("/v1/devices", json={"id": "cam-1"}).status_code == 409
        bundle = digits_bundles.path(1).read_bytes()
        published = http.post(
            "/v1/models", content=bundle, headers={"content-type": "application/octet-stream"}
        )
        assert published.status_code == 201
        r = http.post("/v1/assign", json={"target": "cam-1", "model": "digits", "version": 1})
        assert r.status_code == 200
        assert http.post("/v1/devices/cam-1/revoke").status_code == 200
        assert http.post("/v1/assign", json={"target": "cam-1"}).status_code == 400
        entries = http.get("/v1/audit", params={"after_id": 0}).json()["entries"]

    outcomes = [e for e in entries if e["phase"] == "outcome"]
    assert [(e["action"], e["status"], e["object"]) for e in outcomes] == [
        ("POST /v1/devices", 201, "device:cam-1"),
        ("POST /v1/devices", 409, "device:cam-1"),
        ("POST /v1/models", 201, "model:digits@1"),
        ("POST /v1/assign", 200, "device:cam-1 model:digits@1"),
        ("POST /v1/devices/{device_id}/revoke", 200, "device:cam-1"),
        ("POST /v1/assign", 400, "device:cam-1"),
    ]
    assert {e["actor"] for e in entries} == {"bootstrap-token:admin"}
    assert {e["client"] for e in entries} == {"127.0.0.1"}
    assert entries[0]["change"]["body"]["group"] == hostile  # stored as data
    publish = next(e for e in entries if e["action"] == "POST /v1/models")
    assert publish["phase"] == "attempt"
    assert publish["change"]["body"] == {
        "<body>": "application/octet-stream",
        "<length>": str(len(bundle)),
    }
    assert outcomes[2]["change"]["result"]["name"] == "digits"

    runner = CliRunner()
    env = {"EDGEFLEET_ADMIN_URL": url, "EDGEFLEET_ADMIN_TOKEN": TOKEN}
    listed = runner.invoke(cli, ["audit", "list", "--json", "--object", "device:cam-1"], env=env)
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.output)) == 8  # 4 actions on cam-1, 2 rows each
    table = runner.invoke(cli, ["audit", "list", "--limit", "3"], env=env)
    assert table.exit_code == 0, table.output
    assert "POST /v1/assign" in table.output
    out = tmp_path / "audit.csv"
    exported = runner.invoke(cli, ["audit", "export", "--format", "csv", "--output", str(out)],
                             env=env)  # fmt: skip
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [int(r["id"]) for r in rows] == [e["id"] for e in entries]
    assert all(not v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())
    assert json.loads(rows[0]["change"])["body"]["group"] == hostile
    as_json = runner.invoke(cli, ["audit", "export", "--format", "json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    assert len(json.loads(as_json.output)["entries"]) == len(entries)
    # Once as a real process: the console script, the exit codes of the error boundary.
    proc = subprocess.run(
        [str(BIN), "audit", "list", "--json", "--action", "POST /v1/models"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # Newest first; the attempt cannot name the bundle yet (the answer of the upload does).
    assert [e["object"] for e in json.loads(proc.stdout)] == ["model:digits@1", ""]
    refused = subprocess.run(
        [str(BIN), "audit", "list", "--token", "wrong-token-of-32-characters-xx"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert "token" in refused.stderr


def test_postgresql_refuses_to_change_or_delete_entries(served_pg: tuple[str, Registry]) -> None:
    url, registry = served_pg
    with httpx.Client(base_url=url, headers=AUTH) as http:
        assert http.post("/v1/devices", json={"id": "cam-1"}).status_code == 201
    for statement in (
        "UPDATE audit_log SET actor = 'someone-else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as c:
            c.execute(text(statement))
    with registry.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM audit_log")).scalar() == 2
        actor = c.execute(text("SELECT DISTINCT actor FROM audit_log")).scalar()
        assert actor == "bootstrap-token:admin"
