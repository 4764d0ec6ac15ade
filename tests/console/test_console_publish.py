"""Publishing a bundle from the console: the models page's form (for a role that may publish)
loads ``publish.js`` from the console's own origin, which posts the file to the admin API's
``POST /v1/models`` with the session cookie and the session's CSRF token header. Here the
request the script makes is made directly (the browser test runs the script itself)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_world import ConsoleWorld, login
from starlette.testclient import TestClient

from bundles import DigitsBundles
from fleet_server.registry.audit import AuditQuery, audit_entries

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def world(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path,
                          keys=digits_bundles.keys)  # fmt: skip
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def test_the_models_page_offers_the_upload_to_a_publisher_only(client: TestClient) -> None:
    login(client, "rel")
    page = client.get("/console/models").text
    assert 'id="publish-model"' in page
    assert 'src="/console/static/publish.js"' in page
    script = client.get("/console/static/publish.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "X-CSRF-Token" in script.text
    for account in ("ops", "viv"):
        login(client, account)
        assert 'id="publish-model"' not in client.get("/console/models").text


def test_the_session_publishes_a_signed_bundle_with_its_csrf_header(
    client: TestClient, world: ConsoleWorld, digits_bundles: DigitsBundles
) -> None:
    csrf = login(client, "rel")
    data = digits_bundles.path(1).read_bytes()
    r = client.post("/v1/models", content=data, headers={**OCTET, "X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["version"]) == ("digits", 1)
    assert [(b.name, b.version) for b in world.service.list_models()] == [("digits", 1)]
    assert "digits" in client.get("/console/models").text
    [outcome, attempt] = audit_entries(
        world.registry, AuditQuery(action="POST /v1/models", limit=10)
    )
    assert attempt.actor == "session:rel"
    assert outcome.status == 201


@pytest.mark.parametrize(
    ("account", "csrf", "status"),
    [("rel", "wrong", 403), ("rel", None, 403), ("ops", "own", 403), ("viv", "own", 403)],
    ids=["wrong-token", "no-token", "operator", "viewer"],
)
def test_a_publish_without_the_token_or_the_role_is_refused(
    client: TestClient,
    world: ConsoleWorld,
    digits_bundles: DigitsBundles,
    account: str,
    csrf: str | None,
    status: int,
) -> None:
    own = login(client, account)
    headers = dict(OCTET)
    if csrf is not None:
        headers["X-CSRF-Token"] = own if csrf == "own" else csrf
    r = client.post("/v1/models", content=digits_bundles.path(1).read_bytes(), headers=headers)
    assert r.status_code == status, r.text
    assert world.service.list_models() == []


def test_a_forged_bundle_is_refused_and_shown_as_the_apis_error(
    client: TestClient, world: ConsoleWorld, digits_bundles: DigitsBundles
) -> None:
    csrf = login(client, "rel")
    data = bytearray(digits_bundles.path(1).read_bytes())
    data[-10] ^= 0xFF
    r = client.post("/v1/models", content=bytes(data), headers={**OCTET, "X-CSRF-Token": csrf})
    assert 400 <= r.status_code < 500
    assert r.json()["error"]
    assert world.service.list_models() == []
