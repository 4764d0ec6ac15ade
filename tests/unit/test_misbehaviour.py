"""Per-device refusal counters and presence: the books, the admin API, /metrics and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from bundles import DigitsBundles
from clock import FakeClock
from edge_agent.wire.telemetry import StatusMessage
from fakes import FakeGateway
from fleet_server.admin import client as admin_client
from fleet_server.admin.api import create_app
from fleet_server.cli.main import cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.gateway.misbehaviour import DeviceMisbehaviour, MisbehaviourBook, PresenceBook
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- books
def test_refusals_are_counted_per_device_and_reason_worst_first() -> None:
    clock = FakeClock()
    book = MisbehaviourBook(clock=clock)
    book.add("dev-a", "rate_limited", 5)
    book.add("dev-b", "malformed")
    clock.now += 1
    book.add("dev-a", "foreign_bundle")
    assert [m.device_id for m in book.top(10)] == ["dev-a", "dev-b"]
    a = book.of("dev-a")
    assert (a.total, dict(a.reasons), a.last_reason, a.last_at) == (
        6,
        {"rate_limited": 5, "foreign_bundle": 1},
        "foreign_bundle",
        1001.0,
    )
    assert book.of("dev-z") == DeviceMisbehaviour("dev-z", 0, {}, 0.0, "")
    assert book.top(1)[0].device_id == "dev-a"


def test_the_book_stays_bounded_and_forgets_the_least_misbehaving_device() -> None:
    book = MisbehaviourBook(max_devices=3)
    book.add("noisy", "rate_limited", 1000)
    for i in range(100):  # a stream of one-off devices cannot push the worst one out
        book.add(f"dev-{i}", "malformed")
    top = book.top(10)
    assert len(top) == 3
    assert top[0].device_id == "noisy"
    assert book.evicted == 98


def test_presence_needs_live_traffic_not_just_a_retained_online_status() -> None:
    clock = FakeClock()
    book = PresenceBook(timeout=60.0, monotonic=clock)
    online = StatusMessage("dev-a", "online", 1.0)
    book.status("dev-a", online)  # e.g. retained, replayed after a server restart
    assert book.view()["dev-a"].state == "offline"
    book.heard("dev-a")
    assert book.view()["dev-a"].state == "online"
    clock.now += 61  # silent since: the agent is gone, whatever it left retained
    assert book.view()["dev-a"] == StatusMessage("dev-a", "offline", 1.0, "connection_lost")
    book.heard("dev-a")
    assert book.view()["dev-a"].state == "online"
    book.status("dev-a", StatusMessage("dev-a", "offline", 2.0, "shutdown"))
    assert book.view()["dev-a"].state == "offline"
    book.status("dev-a", None)
    assert book.view() == {}


# --------------------------------------------------------------------------- admin + CLI
@pytest.fixture
def env(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[TestClient, FakeGateway, Registry]]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = FakeGateway(book=MisbehaviourBook())
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", digits_bundles.keys.trusted_root()),
        gateway,
        [digits_bundles.keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    app = create_app(service, TOKEN, max_request_bytes=4096, max_upload_bytes=1 << 20)
    with TestClient(app) as client:
        yield client, gateway, registry
    registry.close()


def test_admin_api_metrics_and_cli_name_the_misbehaving_device(
    env: tuple[TestClient, FakeGateway, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, gateway, registry = env
    registry.enroll("dev-a")
    registry.enroll("dev-b")
    gateway.book.add("dev-b", "rate_limited", 7)
    gateway.book.add("dev-b", "foreign_bundle")

    r = client.get("/v1/misbehaviour", headers=AUTH)
    assert r.status_code == 200
    [row] = r.json()["devices"]
    assert row["device_id"] == "dev-b"
    assert (row["total"], row["reasons"]) == (8, {"foreign_bundle": 1, "rate_limited": 7})
    assert client.get("/v1/devices/dev-b", headers=AUTH).json()["misbehaviour"]["total"] == 8
    assert client.get("/v1/devices/dev-a", headers=AUTH).json()["misbehaviour"]["total"] == 0
    assert client.get("/v1/misbehaviour?top=0", headers=AUTH).status_code == 400
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'edgefleet_gateway_device_refusals{device="dev-b",reason="rate_limited"} 7.0' in metrics

    # The CLI over the same API (the admin client's HTTP goes to the TestClient).
    monkeypatch.setattr(admin_client.httpx, "Client", lambda **kw: _Bridge(client, kw["headers"]))
    result = CliRunner().invoke(
        cli, ["devices", "misbehaviour", "--url", "http://admin", "--token", TOKEN]
    )
    assert result.exit_code == 0, result.output
    assert "dev-b" in result.output
    assert "rate_limited=7" in result.output
    result = CliRunner().invoke(
        cli, ["devices", "show", "dev-b", "--url", "http://admin", "--token", TOKEN]
    )
    assert result.exit_code == 0, result.output
    assert "foreign_bundle=1 rate_limited=7" in result.output


class _Bridge:
    """Stands in for ``httpx.Client``: sends the admin client's requests to the TestClient."""

    def __init__(self, client: TestClient, headers: dict[str, str]) -> None:
        self._client = client
        self._headers = headers

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.pop("timeout", None)
        return self._client.request(method, path, headers=self._headers, **kwargs)

    def close(self) -> None: ...
