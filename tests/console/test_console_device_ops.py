"""Console device actions: operator labels (set, remove) and remote diagnostics (ping, logs,
support bundle), each audited as the admin API request it stands for; device-supplied labels
and command answers shown escaped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_world import ConsoleWorld, login
from starlette.testclient import TestClient

from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.wire.ops.diagnostics import CommandAnswer
from edge_agent.wire.topics import Topics
from fleet_server.console.pages_device_ops import command_view
from fleet_server.diagnostics.book import CommandRecord
from fleet_server.registry import _labels
from fleet_server.registry import labels as label_store
from fleet_server.registry.audit import AuditQuery, audit_entries

P = "\"'><script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    w.registry.enroll("dev-1", group="line-3")
    w.registry.record_reported("dev-1", {"labels": {"site": "north"}})
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        yield c


def _outcomes(world: ConsoleWorld, action: str) -> list[int | None]:
    rows = audit_entries(world.registry, AuditQuery(action=action, limit=20))
    return [r.status for r in rows if r.phase == "outcome"]


def test_an_operator_sets_and_removes_a_label(client: TestClient, world: ConsoleWorld) -> None:
    csrf = login(client, "ops")
    page = client.get("/console/devices/dev-1").text
    assert 'id="set-label"' in page
    assert "north" in page  # the device's own label
    r = client.post("/console/devices/dev-1/labels", data={"key": "site", "value": "south",
                    "csrf_token": csrf}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    found = label_store.device_labels(world.registry, "dev-1")
    assert found.operator == {"site": "south"}
    assert found.effective["site"] == "south"  # the operator's overrides the device's
    r = client.post("/console/devices/dev-1/labels", data={"remove": "site", "csrf_token": csrf},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert label_store.device_labels(world.registry, "dev-1").operator == {}
    assert _outcomes(world, "POST /v1/devices/{device_id}/labels") == [200, 200]
    [entry] = [
        e
        for e in audit_entries(
            world.registry, AuditQuery(action="POST /v1/devices/{device_id}/labels")
        )
        if e.phase == "attempt" and "remove" in str(e.to_dict())
    ]
    assert entry.actor == "session:ops"


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"key": "a", "value": "b", "remove": "a"},
        {"key": "x" * 300, "value": "b"},
        {"key": "bad key!", "value": "b"},
        {"key": "k", "value": "v\x00"},
    ],
    ids=["neither", "both", "long-key", "bad-key", "control-char"],
)
def test_a_bad_label_form_changes_nothing(
    client: TestClient, world: ConsoleWorld, form: dict[str, str]
) -> None:
    csrf = login(client, "ops")
    r = client.post("/console/devices/dev-1/labels", data={**form, "csrf_token": csrf})
    assert r.status_code == 400, r.text
    assert label_store.device_labels(world.registry, "dev-1").operator == {}


def test_diagnostics_buttons_send_signed_commands_and_show_the_answer(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "ops")
    page = client.get("/console/devices/dev-1").text
    for name in ("ping", "logs", "support-bundle"):
        assert f'id="diag-{name}"' in page
    for name in ("ping", "logs"):
        r = client.post("/console/devices/dev-1/commands", data={"name": name,
                        "csrf_token": csrf}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 303, r.text
    topic = Topics().device("commands", "dev-1")
    assert [t for t, _ in world.published.sent] == [topic, topic]
    records = world.diagnostics.of_device("dev-1")
    assert sorted(r.name for r in records) == ["logs", "ping"]
    ping = next(r for r in records if r.name == "ping")
    answer = CommandAnswer("dev-1", ping.id, "ping", True, {"agent_version": P})
    message = Message(Topics().device("command_resp", "dev-1"), answer.to_bytes(), 1, False,
                      MessageProperties(correlation_data=ping.id.encode()))  # fmt: skip
    assert world.diagnostics.on_answer("dev-1", message) is None
    page = client.get("/console/devices/dev-1").text
    assert "answered" in page
    assert "<script>" not in page
    assert ESCAPED in page  # the device's answer, as text
    assert _outcomes(world, "POST /v1/devices/{device_id}/commands") == [202, 202]


@pytest.mark.parametrize("name", ["restart", "capture-upload", "shell", ""])
def test_only_the_console_commands_are_sent(
    client: TestClient, world: ConsoleWorld, name: str
) -> None:
    csrf = login(client, "ops")
    r = client.post("/console/devices/dev-1/commands", data={"name": name, "csrf_token": csrf})
    assert r.status_code == 400
    assert world.published.sent == []


def test_a_revoked_device_gets_no_command(client: TestClient, world: ConsoleWorld) -> None:
    csrf = login(client, "ops")
    client.post("/console/devices/dev-1/revoke", data={"csrf_token": csrf})
    page = client.get("/console/devices/dev-1").text
    assert 'id="diag-ping"' not in page
    r = client.post("/console/devices/dev-1/commands", data={"name": "ping", "csrf_token": csrf})
    assert r.status_code == 404
    assert world.published.sent == []


def test_a_viewer_sees_labels_and_commands_but_no_buttons(
    client: TestClient, world: ConsoleWorld
) -> None:
    login(client, "viv")
    page = client.get("/console/devices/dev-1").text
    assert "north" in page
    assert 'id="set-label"' not in page
    assert 'id="diag-' not in page
    assert "/labels" not in page
    assert "/commands" not in page


def _record(name: str, state: str) -> CommandRecord:
    return CommandRecord("a" * 32, "dev-1", name, {}, 1, 1.0, 2.0, state, None, None, None)


def test_an_uploaded_support_bundle_gets_a_download_link() -> None:
    link = command_view("dev-1", _record("support-bundle", "uploaded"))["download"]
    assert link == f"/v1/devices/dev-1/support-bundles/{'a' * 32}"
    for name, state in (("support-bundle", "uploading"), ("support-bundle", "pending"),
                        ("logs", "uploaded")):  # fmt: skip
        assert command_view("dev-1", _record(name, state))["download"] is None


def test_device_labels_are_escaped(client: TestClient, world: ConsoleWorld) -> None:
    with world.registry.write_session("test") as s:  # past the parser, as a hostile store
        _labels.replace_source(s, "dev-1", "device", {f"k{P}": f"v{P}"})
    login(client, "ops")
    page = client.get("/console/devices/dev-1").text
    assert P not in page
    assert f"k&#34;&#39;&gt;{ESCAPED}" in page
    assert f"v&#34;&#39;&gt;{ESCAPED}" in page
