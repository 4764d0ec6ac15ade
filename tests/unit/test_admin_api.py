"""fleet_server.admin.api through Starlette's TestClient: auth, every route, error mapping."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bundles import DigitsBundles
from edge_agent.trust.desired import verify_desired_state
from edge_agent.wire.telemetry import StatusMessage
from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def env(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[TestClient, FakeGateway, Registry]]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = FakeGateway()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        gateway,
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    app = create_app(service, TOKEN, max_request_bytes=4096, max_upload_bytes=4 * 1024 * 1024)
    with TestClient(app) as client:
        yield client, gateway, registry
    registry.close()


ROUTES = [
    ("GET", "/v1/status"),
    ("GET", "/v1/devices"),
    ("GET", "/v1/devices/cam-1"),
    ("POST", "/v1/devices"),
    ("POST", "/v1/devices/cam-1/revoke"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("POST", "/v1/assign"),
    ("POST", "/v1/waves"),
    ("GET", "/v1/telemetry"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_every_route_needs_the_token(
    env: tuple[TestClient, FakeGateway, Registry],
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    client, _, registry = env
    r = client.request(method, path, headers=headers, json={"id": "cam-1"})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert registry.list_devices() == []  # nothing happened


def test_healthz_is_open(env: tuple[TestClient, FakeGateway, Registry]) -> None:
    assert env[0].get("/healthz").json() == {"ok": True}


def test_publish_register_assign_show_flow(
    env: tuple[TestClient, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    client, gateway, _ = env
    data = digits_bundles.path(1).read_bytes()
    r = client.post(
        "/v1/models",
        content=data,
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["name"], model["version"], model["length"]) == ("digits", 1, len(data))
    [listed] = client.get("/v1/models", headers=AUTH).json()["models"]
    assert listed.pop("history")["status"] == "clean"  # never rolled out
    assert listed == model

    r = client.post(
        "/v1/devices", headers=AUTH, json={"id": "cam-1", "group": "lobby", "tags": {"site": "a"}}
    )
    assert r.status_code == 201
    assert r.json()["group"] == "lobby"
    assert client.post("/v1/devices", headers=AUTH, json={"id": "cam-1"}).status_code == 409

    r = client.post(
        "/v1/assign",
        headers=AUTH,
        json={"target": "lobby", "group": True, "model": "digits", "version": 1},
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [
        {"device_id": "cam-1", "desired_version": 1, "published": True, "error": None}
    ]
    verify_desired_state(
        digits_bundles.keys.trusted_root(),
        gateway.published[0][1],
        now=datetime.now(UTC),
        device_id="cam-1",
        last_version=0,
    )
    gateway.status["cam-1"] = StatusMessage("cam-1", "online", 1.0)
    [row] = client.get("/v1/devices", headers=AUTH).json()["devices"]
    assert row["online"] is True
    assert row["desired"]["digits"]["version"] == 1
    detail = client.get("/v1/devices/cam-1", headers=AUTH).json()
    assert detail["seq"]["acked_upto"] == 0
    assert detail["status"]["state"] == "online"

    r = client.post("/v1/waves", headers=AUTH, json={"sha256": model["sha256"]})
    assert r.status_code == 202
    assert r.json()["wave"] == "wave-1"  # the gateway's wave id, for the sha256 asked
    assert gateway.waves == [model["sha256"]]

    st = client.get("/v1/status", headers=AUTH).json()
    assert (st["devices"], st["online"], st["bundles"]) == (1, 1, 1)
    assert st["gateway"] == {"desired_published": 1}
    metrics = client.get("/metrics", headers=AUTH).text
    assert "edgefleet_server_devices_online 1.0" in metrics
    assert "edgefleet_gateway_desired_published 1.0" in metrics

    r = client.post("/v1/devices/cam-1/revoke", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    r = client.post(
        "/v1/assign", headers=AUTH, json={"target": "cam-1", "model": "digits", "version": 1}
    )
    assert r.status_code == 409
    assert r.json()["code"] == "device_revoked"


def test_telemetry_route(env: tuple[TestClient, FakeGateway, Registry]) -> None:
    client, _, registry = env
    registry.enroll("cam-1")
    registry.ingest("cam-1", [TelemetryEntry(1, "event", {"x": 1}), TelemetryEntry(2, "event", {})])
    rows = client.get("/v1/telemetry", headers=AUTH).json()["telemetry"]
    assert [(t["device_id"], t["seq"]) for t in rows] == [("cam-1", 1), ("cam-1", 2)]
    later = client.get(f"/v1/telemetry?after_id={rows[0]['id']}", headers=AUTH).json()
    assert [t["seq"] for t in later["telemetry"]] == [2]
    assert client.get("/v1/telemetry?limit=0", headers=AUTH).status_code == 400
    assert client.get("/v1/telemetry?after_id=x", headers=AUTH).status_code == 400
    # Without after_id the route is a tail: the NEWEST entries, oldest of them first.
    registry.ingest("cam-1", [TelemetryEntry(s, "event", {}) for s in range(3, 8)])
    tail = client.get("/v1/telemetry?limit=3", headers=AUTH).json()["telemetry"]
    assert [t["seq"] for t in tail] == [5, 6, 7]
    first = client.get("/v1/telemetry?limit=3&after_id=0", headers=AUTH).json()["telemetry"]
    assert [t["seq"] for t in first] == [1, 2, 3]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/devices/cam-404", None, 404, "device_unknown"),
        ("POST", "/v1/devices/cam-404/revoke", None, 404, "device_unknown"),
        ("POST", "/v1/devices", {"id": "Bad Id!"}, 400, "registry_error"),
        ("POST", "/v1/devices", {"group": "x"}, 400, "bad_request"),
        ("POST", "/v1/devices", {"id": "cam-1", "tags": []}, 400, "bad_request"),
        (
            "POST",
            "/v1/assign",
            {"target": "cam-1", "model": "digits", "version": "1"},
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/assign",
            {"target": "cam-1", "model": "digits", "version": 3},
            404,
            "model_unknown",
        ),
        (
            "POST",
            "/v1/assign",
            {"target": "g", "group": True, "model": "digits", "version": 3},
            404,
            "model_unknown",
        ),
        ("POST", "/v1/waves", {"sha256": "f" * 64}, 404, "model_unknown"),
        ("POST", "/v1/waves", [], 400, "bad_json"),
    ],
)
def test_errors_are_typed_json(
    env: tuple[TestClient, FakeGateway, Registry],
    method: str,
    path: str,
    body: object,
    status: int,
    code: str,
) -> None:
    r = env[0].request(method, path, headers=AUTH, json=body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert r.json()["error"]


def test_bad_bodies(env: tuple[TestClient, FakeGateway, Registry]) -> None:
    client = env[0]
    r = client.post("/v1/devices", headers=AUTH, content=b"{not json")
    assert r.status_code == 400
    assert r.json()["code"] == "bad_json"
    r = client.post("/v1/devices", headers=AUTH, content=b"{" + b" " * 10_000 + b"}")
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"
    r = client.post("/v1/models", headers=AUTH, content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413
    r = client.post("/v1/models", headers=AUTH, content=b"garbage" * 100)
    assert r.status_code == 400
    assert r.json()["code"] == "bundle_rejected"


def test_short_token_refused() -> None:
    with pytest.raises(ValueError, match="16"):
        create_app(object(), "short")  # type: ignore[arg-type]


def test_extra_metrics_are_exported_as_gauges(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", digits_bundles.keys.trusted_root()),
        FakeGateway(),
        [digits_bundles.keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    worker_stats = {"answered": 7, "queue_wait_ms_p99": 1.5, "note": "text"}
    app = create_app(service, TOKEN, extra_metrics=(("fallback", lambda: worker_stats),))
    with TestClient(app) as client:
        text = client.get("/metrics", headers=AUTH).text
    assert "edgefleet_fallback_answered 7.0" in text
    assert "edgefleet_fallback_queue_wait_ms_p99 1.5" in text
    assert "edgefleet_fallback_note" not in text  # only numbers
    registry.close()
