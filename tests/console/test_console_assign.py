"""Direct assignment from the models page: one version to a device or a group, audited as
``POST /v1/assign``, with the service's quarantine check and a form that refuses bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_world import ConsoleWorld, login
from starlette.testclient import TestClient

from bundles import DigitsBundles
from fleet_server.registry.audit import AuditQuery, audit_entries
from fleet_server.registry.rollouts import quarantine_version


@pytest.fixture
def world(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path, keys=digits_bundles.keys)
    for i in range(3):
        w.registry.enroll(f"dev-{i}", group="line-3")
    for v in (1, 2):  # real signed bundles: an assignment signs their targets
        w.service.publish_model_bytes(digits_bundles.path(v).read_bytes())
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def _form(csrf: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf, "model": "digits", "version": "2", "kind": "device",
            "target": "dev-1", **fields}  # fmt: skip


def test_a_release_manager_assigns_to_a_device_and_to_a_group(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "rel")
    assert 'id="assign-form"' in client.get("/console/models").text
    r = client.post("/console/assign", data=_form(csrf), follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console/devices/dev-1"
    assert [d for d, _ in world.gateway.published] == ["dev-1"]
    r = client.post("/console/assign", data=_form(csrf, kind="group", target="line-3"),
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert r.headers["location"] == "/console/devices?group=line-3"
    assert sorted(d for d, _ in world.gateway.published[1:]) == ["dev-0", "dev-1", "dev-2"]
    rows = audit_entries(world.registry, AuditQuery(action="POST /v1/assign", limit=10))
    assert [r.status for r in rows if r.phase == "outcome"] == [200, 200]
    assert {r.actor for r in rows} == {"session:rel"}


def test_a_quarantined_version_needs_an_override_reason(
    client: TestClient, world: ConsoleWorld
) -> None:
    quarantine_version(world.registry, "digits", 2, "bad canary", world.clock.wall())
    csrf = login(client, "rel")
    r = client.post("/console/assign", data=_form(csrf))
    assert r.status_code == 409, r.text
    assert world.gateway.published == []
    r = client.post("/console/assign", data=_form(csrf, override_quarantine="hotfix tested"),
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    assert [d for d, _ in world.gateway.published] == ["dev-1"]


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"version": "0"}, 400),
        ({"version": "x"}, 400),
        ({"version": "9" * 20}, 400),
        ({"kind": "everyone"}, 400),
        ({"target": ""}, 400),
        ({"target": "x" * 200}, 400),
        ({"model": "nope"}, 404),
        ({"target": "ghost"}, 404),
        ({"kind": "group", "target": "no-such-group"}, 404),
    ],
    ids=[
        "zero",
        "not-a-number",
        "huge",
        "bad-kind",
        "no-target",
        "long-target",
        "no-model",
        "no-device",
        "no-group",
    ],
)
def test_a_bad_assignment_changes_nothing(
    client: TestClient, world: ConsoleWorld, fields: dict[str, str], status: int
) -> None:
    csrf = login(client, "rel")
    r = client.post("/console/assign", data=_form(csrf, **fields))
    assert r.status_code == status, r.text
    assert world.gateway.published == []


@pytest.mark.parametrize("account", ["ops", "viv"])
def test_an_account_that_may_not_assign_sees_no_form(client: TestClient, account: str) -> None:
    login(client, account)
    assert 'id="assign-form"' not in client.get("/console/models").text
