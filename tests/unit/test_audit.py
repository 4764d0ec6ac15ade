"""The audit log (fleet_server.admin.audit, registry.audit): CSV/JSON escaping of hostile text,
every state-changing route of the full admin app recorded, no action without its entry."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

import fleet_server.admin.audit as audit_mod
from bundles import DigitsBundles
from fakes import FakeGateway
from fleet_server.accounts.store import Accounts
from fleet_server.admin.accounts import account_routes
from fleet_server.admin.accuracy import accuracy_routes
from fleet_server.admin.api import create_app
from fleet_server.admin.audit import MAX_CHANGE_BYTES, Auditor, change_of, object_of
from fleet_server.admin.audit_routes import csv_cell, entries_csv
from fleet_server.admin.drift import drift_routes
from fleet_server.admin.evalsets import evalset_routes
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.admin.root import root_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import RegistryUnavailableError
from fleet_server.registry.audit import AuditEntry, AuditQuery, audit_entries
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# Escaping (pure).
@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+2", "'=1+2"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ('=HYPERLINK("http://evil")', '\'=HYPERLINK("http://evil")'),
        ("\t=1", "'\\u0009=1"),
        ("\r=1", "'\\u000d=1"),
        ("line1\nline2", "line1\\u000aline2"),
        ("nul\x00bel\x07esc\x1b", "nul\\u0000bel\\u0007esc\\u001b"),
        ("del\x7f", "del\\u007f"),
        ("sep\u2028par\u2029", "sep\\u2028par\\u2029"),
        ("caméra-Ω-📷", "caméra-Ω-📷"),
        ('a,b;"c"', 'a,b;"c"'),
        ("plain", "plain"),
        ("", ""),
        (None, ""),
        (409, "409"),
        ({"k": "=x"}, '{"k": "=x"}'),
        (-5, "'-5"),
    ],
)
def test_csv_cell_neutralises_formulas_and_control_characters(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


def test_a_hostile_entry_stays_one_csv_row_and_reads_back_as_data() -> None:
    hostile = "=cmd|' /C calc'!A0\r\n@evil,\"x\"\x00"
    entry = AuditEntry(
        "r1", "outcome", "token:admin", "10.0.0.1", "POST /v1/devices",
        f"device:{hostile}", {"body": {"id": hostile}}, 409, "exists", 7,
        datetime(2026, 12, 7, tzinfo=UTC),
    )  # fmt: skip
    text = "".join(entries_csv([entry]))
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 2
    header, row = rows
    got = dict(zip(header, row, strict=True))
    assert got["object"].startswith("device:=cmd")  # not at the cell's start: harmless
    assert text.count("\r\n") == 2  # only the two line ends
    for bad in ("\r", "\n", "\x00"):
        assert not any(bad in cell for cell in row)
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row)
    assert json.loads(got["change"])["body"]["id"] == hostile  # JSON escapes it itself


def test_change_redacts_secrets_and_is_bounded() -> None:
    change = change_of(
        {"device_id": "d"},
        {"note": "n"},
        {"id": "x", "token": "s3cret", "nested": {"PrivateKey": "k", "password": "p"}},
    )
    text = json.dumps(change)
    for secret in ("s3cret", '"k"', '"p"'):
        assert secret not in text
    assert change["body"]["nested"]["PrivateKey"] == "<redacted>"
    big = change_of({}, {}, {f"f{i}": "x" * 250 for i in range(60)})
    assert len(json.dumps(big)) <= MAX_CHANGE_BYTES
    assert big["truncated"] > MAX_CHANGE_BYTES


def test_object_names_the_thing_acted_on() -> None:
    assert object_of({"device_id": "cam-1"}, {}, {}) == "device:cam-1"
    assert object_of({"rollout_id": "7"}, {}, {}) == "rollout:7"
    assert object_of({}, {}, {"id": "cam-2"}) == "device:cam-2"
    assert (
        object_of({}, {}, {"target": "g", "group": True, "model": "m", "version": 2})
        == "group:g model:m@2"
    )
    assert object_of({}, {}, {"model": "digits", "version": 3}) == "model:digits@3"
    assert object_of({}, {}, {"name": "digits", "version": 3}) == "model:digits@3"
    assert object_of({}, {"model": "digits"}, {}) == "model:digits"
    assert object_of({"name": "alice"}, {}, {"role": "viewer"}) == "account:alice"
    assert object_of({}, {}, {"name": "bob", "role": "viewer"}) == "account:bob"
    assert object_of({"token_id": "0f" * 8}, {}, {}) == f"api_token:{'0f' * 8}"
    assert object_of({}, {}, {"account": "bob", "expires_days": 7}) == "account:bob"
    assert object_of({}, {}, {"expires_days": 7}) == "api_token:new"


# The full app.
@pytest.fixture
def env(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[tuple[TestClient, Registry]]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    absent = cast(Any, None)  # parts the recording does not need: their handlers fail (500)
    app = create_app(
        service,
        TOKEN,
        max_request_bytes=4096,
        max_upload_bytes=4 * 1024 * 1024,
        # Every route provider the server mounts (fleet_server.server.run).
        extra_routes=(
            lambda guard: drift_routes(absent, guard),
            lambda guard: accuracy_routes(registry, lambda: datetime.now(UTC), guard),
            lambda guard: rollout_routes(absent, guard),
            lambda guard: evalset_routes(absent, guard),
            lambda guard: root_routes(service, guard),
            lambda guard: account_routes(Accounts(registry, lambda: datetime.now(UTC)), guard),
        ),
        auditor=Auditor(registry, lambda: datetime.now(UTC), max_body_bytes=1024 * 1024),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, registry
    registry.close()


def _state_changing(client: TestClient) -> list[tuple[str, str]]:
    out = []
    for route in cast(Any, client.app).routes:
        assert isinstance(route, Route)
        for method in sorted(set(route.methods or ()) - {"GET", "HEAD"}):
            out.append((method, route.path))
    return out


def test_every_state_changing_route_is_recorded_before_and_after(
    env: tuple[TestClient, Registry],
) -> None:
    client, registry = env
    routes = _state_changing(client)
    assert len(routes) >= 10  # devices, revoke, models, assign, waves, rollouts..., evalsets, root
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", "x-1", path)
        r = client.request(method, concrete, headers=AUTH, json={"id": "=evil", "token": "s3"})
        entries = audit_entries(registry, AuditQuery(action=f"{method} {path}", limit=10))
        phases = sorted(e.phase for e in entries)
        assert phases == ["attempt", "outcome"], f"{method} {path} is not audited"
        attempt = next(e for e in entries if e.phase == "attempt")
        outcome = next(e for e in entries if e.phase == "outcome")
        assert outcome.request_id == attempt.request_id
        assert outcome.status == r.status_code
        assert attempt.actor == "bootstrap-token:admin"
        assert attempt.client == "testclient"
        assert "s3" not in json.dumps(attempt.change)
        if r.status_code >= 400:
            assert outcome.code == r.json()["code"]


def test_reads_and_unauthenticated_requests_are_not_recorded(
    env: tuple[TestClient, Registry],
) -> None:
    client, registry = env
    assert client.get("/v1/devices", headers=AUTH).status_code == 200
    assert client.post("/v1/devices", json={"id": "cam-1"}).status_code == 401
    assert audit_entries(registry, AuditQuery()) == []


def test_refusals_are_recorded_with_their_code(env: tuple[TestClient, Registry]) -> None:
    client, registry = env
    assert client.post("/v1/devices", headers=AUTH, json={"id": "cam-1"}).status_code == 201
    assert client.post("/v1/devices", headers=AUTH, json={"id": "cam-1"}).status_code == 409
    assert client.post("/v1/devices", headers=AUTH, content=b"{nope").status_code == 400
    too_big = b'{"id": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    assert client.post("/v1/devices", headers=AUTH, content=too_big).status_code == 413
    outcomes = [
        (e.status, e.code, e.object)
        for e in audit_entries(registry, AuditQuery(after_id=0))
        if e.phase == "outcome"
    ]
    assert outcomes == [
        (201, "", "device:cam-1"),
        (409, outcomes[1][1], "device:cam-1"),
        (400, "bad_json", ""),
        (413, "too_large", ""),
    ]
    assert outcomes[1][1]  # the conflict's stable code


def test_no_action_runs_when_its_attempt_cannot_be_written(
    env: tuple[TestClient, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = env

    def down(*args: object) -> AuditEntry:
        raise RegistryUnavailableError("database unavailable")

    monkeypatch.setattr(audit_mod, "append_entry", down)
    r = client.post("/v1/devices", headers=AUTH, json={"id": "cam-9"})
    assert r.status_code == 503
    assert r.json()["code"] == "registry_unavailable"
    assert "audit" in r.json()["error"]
    monkeypatch.undo()
    assert client.get("/v1/devices/cam-9", headers=AUTH).status_code == 404


def test_query_filters_paging_and_exports(env: tuple[TestClient, Registry]) -> None:
    client, _ = env
    for i in range(3):
        client.post("/v1/devices", headers=AUTH, json={"id": f"=cam-{i}"})
    client.post("/v1/devices/=cam-1/revoke", headers=AUTH)
    newest = client.get("/v1/audit", headers=AUTH, params={"limit": 2}).json()["entries"]
    assert [e["phase"] for e in newest] == ["outcome", "attempt"]
    assert newest[0]["object"] == "device:=cam-1"
    assert newest[0]["id"] > newest[1]["id"]
    page = client.get("/v1/audit", headers=AUTH, params={"after_id": 2, "limit": 3}).json()
    assert [e["id"] for e in page["entries"]] == [3, 4, 5]
    by_object = client.get("/v1/audit", headers=AUTH, params={"object": "device:=cam-1"}).json()
    assert {e["action"] for e in by_object["entries"]} == {
        "POST /v1/devices",
        "POST /v1/devices/{device_id}/revoke",
    }
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.get("/v1/audit", headers=AUTH, params={"since": future}).json() == {"entries": []}
    assert client.get("/v1/audit", headers=AUTH, params={"since": "yesterday"}).status_code == 400
    assert client.get("/v1/audit", headers=AUTH, params={"limit": 0}).status_code == 400

    csv_text = client.get("/v1/audit/export", headers=AUTH, params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [int(r["id"]) for r in rows] == list(range(1, 9))
    assert {r["object"] for r in rows} >= {"device:=cam-0"}
    exported = client.get("/v1/audit/export", headers=AUTH, params={"format": "json"}).json()
    assert [e["id"] for e in exported["entries"]] == list(range(1, 9))
    assert client.get("/v1/audit/export", headers=AUTH, params={"format": "xml"}).status_code == 400
    # Reading the log is not recorded.
    assert len(client.get("/v1/audit", headers=AUTH).json()["entries"]) == 8


def test_an_outcome_that_cannot_be_written_leaves_the_attempt_and_the_answer(
    env: tuple[TestClient, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, registry = env
    real = audit_mod.append_entry

    def outcome_down(reg: Registry, entry: AuditEntry, at: datetime) -> AuditEntry:
        if entry.phase == "outcome":
            raise RegistryUnavailableError("database unavailable")
        return real(reg, entry, at)

    monkeypatch.setattr(audit_mod, "append_entry", outcome_down)
    assert client.post("/v1/devices", headers=AUTH, json={"id": "cam-3"}).status_code == 201
    monkeypatch.undo()
    assert [e.phase for e in audit_entries(registry, AuditQuery())] == ["attempt"]
    assert client.get("/v1/devices/cam-3", headers=AUTH).status_code == 200


def test_a_bundle_without_a_content_type_is_not_read_by_the_guard(
    env: tuple[TestClient, Registry],
) -> None:
    client, registry = env
    big = b"\x00" * (2 * 1024 * 1024)  # over the guard's 1 MiB JSON cap, under the upload cap
    r = client.post("/v1/models", headers={**AUTH, "content-type": ""}, content=big)
    assert r.status_code == 400  # not a bundle: the route read it, not a 413 from the guard
    attempt = audit_entries(registry, AuditQuery(after_id=0))[0]
    assert attempt.change["body"] == {"<body>": "", "<length>": str(len(big))}
