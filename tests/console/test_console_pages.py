"""The console's pages and writes through Starlette's TestClient over real parts
(``console_world``): login and sessions, every page, filters and paging, the security headers,
rollout create and commands through the same runner as the API, each write in the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_world import PASSWORD, ConsoleWorld, login
from starlette.testclient import TestClient

from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry import ModelStats, StatusMessage, TelemetryReport
from edge_agent.wire.telemetry_ground_truth import GroundTruthStats
from fleet_server.console.web import SECURITY_HEADERS
from fleet_server.registry.audit import AuditQuery, audit_entries

PAGES = [
    "/console/",
    "/console/devices",
    "/console/devices/dev-0",
    "/console/models",
    "/console/rollouts",
    "/console/drift",
    "/console/drift?model=digits",
    "/console/fallback",
    "/console/audit",
]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    for i in range(12):
        w.registry.enroll(f"dev-{i}", group="line-3" if i < 10 else "lab", tags={"site": "a"})
    for v in (1, 2):
        w.registry.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64, length=10,
                                  targets_sha256=f"{v + 2}" * 64)  # fmt: skip
    for i in range(10):
        w.install(f"dev-{i}", 1, 1)
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app(), base_url="http://testserver") as c:
        yield c


def test_pages_need_a_session_and_send_the_login_page_otherwise(client: TestClient) -> None:
    for page in PAGES:
        r = client.get(page, follow_redirects=False)
        assert r.status_code == 303, page
        assert r.headers["location"].startswith("/console/login?next=")
    r = client.get("/console/login")
    assert r.status_code == 200
    assert 'name="password"' in r.text


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_the_security_headers(
    client: TestClient, world: ConsoleWorld, page: str
) -> None:
    world.report("dev-0", 1, 100, at=1000.0)
    world.report("dev-0", 1, 250, at=1060.0)
    login(client, "viv" if page != "/console/audit" else "ops")
    r = client.get(page)
    assert r.status_code == 200, r.text
    for k, v in SECURITY_HEADERS.items():
        assert r.headers[k] == v
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    assert "<script>" not in r.text  # the only script is the shipped htmx file
    assert r.text.count("<script") == 1


def test_unknown_pages_and_assets_are_404_pages_with_the_headers(client: TestClient) -> None:
    for url in ("/console/nope", "/console/static/evil.js", "/console/static/htmx.LICENSE"):
        r = client.get(url, follow_redirects=False)
        assert r.status_code == 404, url
        assert r.headers["x-frame-options"] == "DENY"
    assert client.get("/console", follow_redirects=False).headers["location"] == "/console/"
    js = client.get("/console/static/htmx.min.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert js.content.startswith(b"var htmx=function()")


def test_a_viewer_does_not_see_the_audit_log(client: TestClient) -> None:
    login(client, "viv")
    assert 'href="/console/audit"' not in client.get("/console/").text
    assert client.get("/console/audit").status_code == 403


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(
    client: TestClient, world: ConsoleWorld
) -> None:
    r = client.post("/console/login", data={"name": "ops", "password": PASSWORD},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("edgefleet_session=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()
    assert "secure" not in cookie.lower()  # plain HTTP here; over TLS it is Secure
    page = client.get("/console/")
    assert page.status_code == 200
    assert "ops" in page.text
    csrf = login(client, "ops")
    assert client.post("/console/logout", data={"csrf_token": csrf},
                       follow_redirects=False).status_code == 303  # fmt: skip
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_a_wrong_password_fails_without_saying_which_part_was_wrong(client: TestClient) -> None:
    wrong = client.post("/console/login", data={"name": "ops", "password": "nope nope nope"})
    unknown = client.post("/console/login", data={"name": "nobody", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert "login failed: wrong account name or password" in wrong.text
    assert "edgefleet_session" not in wrong.headers.get("set-cookie", "")


def test_login_redirects_only_inside_the_console(client: TestClient) -> None:
    for nxt in ("https://evil.example/", "//evil.example/", "/console/\\evil", "/v1/status"):
        r = client.post("/console/login", data={"name": "ops", "password": PASSWORD,
                        "next": nxt}, follow_redirects=False)  # fmt: skip
        assert r.headers["location"] == "/console/", nxt
    r = client.post("/console/login", data={"name": "ops", "password": PASSWORD,
                    "next": "/console/models"}, follow_redirects=False)  # fmt: skip
    assert r.headers["location"] == "/console/models"


def test_a_cross_site_login_is_refused(client: TestClient) -> None:
    r = client.post("/console/login", data={"name": "ops", "password": PASSWORD},
                    headers={"origin": "https://evil.example"}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 403
    assert "set-cookie" not in r.headers


def test_device_list_filters_and_pages_in_the_registry(
    client: TestClient, world: ConsoleWorld
) -> None:
    for i in range(60):
        world.registry.enroll(f"bulk-{i:03d}", group="bulk", tags={"row": str(i % 3)})
    world.gateway.status["dev-1"] = StatusMessage("dev-1", "online", 0.0, "connected")
    login(client, "viv")
    r = client.get("/console/devices?group=bulk")
    assert "60 device(s), page 1 of 2" in r.text
    assert "bulk-049" in r.text
    assert "bulk-050" not in r.text
    r = client.get("/console/devices?group=bulk&page=2")
    assert "bulk-050" in r.text
    assert "bulk-049" not in r.text
    r = client.get("/console/devices?tag=row%3D1&group=bulk")
    assert "20 device(s)" in r.text
    r = client.get("/console/devices?state=online")
    assert "1 device(s)" in r.text
    assert "dev-1" in r.text
    world.install("dev-3", 2, 2)
    r = client.get("/console/devices?version=digits%402")
    assert "1 device(s)" in r.text
    assert "dev-3" in r.text
    r = client.get("/console/devices?version=digits%401")
    assert "9 device(s)" in r.text
    # Labels (enrollment tags that are valid labels become operator labels): a selector.
    r = client.get("/console/devices?labels=row%3D1")
    assert "20 device(s)" in r.text
    r = client.get("/console/devices?labels=row+in+(0,2)&group=bulk")
    assert "40 device(s)" in r.text
    r = client.get("/console/devices?labels=row!%3D1,row")
    assert "40 device(s)" in r.text
    for bad in ("state=sleepy", "tag=novalue", "version=digits%40x", "page=0", "labels=row+in+(1"):
        assert client.get(f"/console/devices?{bad}").status_code == 400, bad


def test_device_page_shows_reported_versions_telemetry_and_events(
    client: TestClient, world: ConsoleWorld
) -> None:
    world.report("dev-0", 1, 100, at=1000.0)
    world.report("dev-0", 1, 250, at=1060.0)
    login(client, "viv")
    r = client.get("/console/devices/dev-0")
    assert r.status_code == 200
    assert "Requests per report window" in r.text
    assert "<polyline" in r.text  # two windows: a line
    assert "active" in r.text
    assert "kept" in r.text
    assert client.get("/console/devices/nope").status_code == 404


def test_rollout_create_and_commands_go_through_the_runner_and_the_audit_log(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "rel")
    form = {"csrf_token": csrf, "model": "digits", "version": "2", "target": "group",
            "selector": "line-3", "canary_count": "2", "steps": "0.5, 1",
            "on_breach": "pause", "min_devices": "2"}  # fmt: skip
    r = client.post("/console/rollouts", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    [rollout] = world.runner.rollouts()
    assert r.headers["location"] == f"/console/rollouts/{rollout.id}"
    assert rollout.policy.canary_count == 2
    assert rollout.policy.steps == (0.5, 1.0)
    assert rollout.policy.on_breach == "pause"
    live = client.get(r.headers["location"])
    assert "pending" in live.text
    assert 'hx-trigger="every 2s"' in live.text
    r = client.post(f"/console/rollouts/{rollout.id}/pause", data={"csrf_token": csrf},
                    headers={"hx-request": "true"})  # fmt: skip
    assert r.status_code == 200
    assert 'id="live"' in r.text
    assert "paused" in r.text
    r = client.post(f"/console/rollouts/{rollout.id}/abort", data={"csrf_token": csrf},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    assert world.runner.get(rollout.id).state == "aborted"
    final = client.get(f"/console/rollouts/{rollout.id}")
    assert "hx-trigger" not in final.text  # nothing to poll once final
    entries = audit_entries(world.registry, AuditQuery(actor="session:rel", limit=100))
    actions = [(e.phase, e.action, e.status) for e in reversed(entries)]
    assert actions == [
        ("attempt", "POST /console/login", None),
        ("outcome", "POST /console/login", 303),
        ("attempt", "POST /v1/rollouts", None),
        ("outcome", "POST /v1/rollouts", 201),
        ("attempt", "POST /v1/rollouts/{rollout_id}/pause", None),
        ("outcome", "POST /v1/rollouts/{rollout_id}/pause", 200),
        ("attempt", "POST /v1/rollouts/{rollout_id}/abort", None),
        ("outcome", "POST /v1/rollouts/{rollout_id}/abort", 200),
    ]
    created = entries[-3]  # the oldest two are the login's
    assert created.object == "model:digits@2"
    assert created.change["query"] == {"via": "console"}
    assert created.change["body"]["group"] == "line-3"
    assert entries[0].object == f"rollout:{rollout.id}"
    page = client.get("/console/audit?actor=session%3Arel")
    assert page.text.count("<td>POST /v1/rollouts") == 6
    # The export links are the API's routes, authenticated by the session cookie.
    export = client.get("/v1/audit/export?actor=session%3Arel&format=json")
    assert export.status_code == 200
    assert len(export.json()["entries"]) == 8  # with the login's two
    assert 'href="/v1/audit/export?actor=session%3Arel&amp;format=csv"' in page.text


def test_a_bad_policy_is_refused_with_the_field_named_and_recorded(
    client: TestClient, world: ConsoleWorld
) -> None:
    csrf = login(client, "rel")
    form = {"csrf_token": csrf, "model": "digits", "version": "2", "target": "group",
            "selector": "line-3", "canary_fraction": "7"}  # fmt: skip
    r = client.post("/console/rollouts", data=form)
    assert r.status_code == 400
    assert "canary_fraction" in r.text
    assert world.runner.rollouts() == []
    query = AuditQuery(actor="session:rel", action="POST /v1/rollouts", limit=10)
    [outcome, _] = audit_entries(world.registry, query)
    assert (outcome.status, outcome.code) == (400, "rollout_policy_invalid")


def test_policy_form_shows_the_defaults_of_rollout_policy(client: TestClient) -> None:
    login(client, "rel")
    r = client.get("/console/rollouts")
    assert 'name="canary_fraction" value="0.1"' in r.text
    assert 'name="thresholds.max_rollback_rate" value="0.1"' in r.text
    assert 'name="dwell_seconds" value="300"' in r.text


def test_field_accuracy_page_shows_labelled_answers_per_version_and_group(
    client: TestClient, world: ConsoleWorld
) -> None:
    labelled = Confusion.from_labels([0, 1, 2, 2, 1], [0, 1, 2, 1, 1], 3)
    for seq, confusion in ((1, Confusion.zero(3)), (2, labelled)):
        stats = ModelStats(version=1, outcomes={"ok": 5 * seq, "error": 0, "rejected": 0},
                           ground_truth=GroundTruthStats(confusion={1: confusion}))  # fmt: skip
        report = TelemetryReport("dev-0", seq, seq - 1.0, float(seq), started_at=1.0,
                                 models={"digits": stats})  # fmt: skip
        world.registry.ingest("dev-0", [report])
    login(client, "viv")
    assert 'href="/console/models/digits/accuracy"' in client.get("/console/models").text
    r = client.get("/console/models/digits/accuracy?hours=48")
    assert r.status_code == 200, r.text
    fleet = r.text.split("<td>fleet</td>")[1].split("</tr>")[0]
    assert '<td class="num">5</td><td class="num">4</td><td class="num">80.00%</td>' in fleet
    assert "<td>group line-3</td>" in r.text
    assert "2 → 1 → 1" in r.text  # the confusion: label 2 answered 1, once
    assert "no labelled answers in this window" in r.text  # v2 has none
    assert client.get("/console/models/nope/accuracy").status_code == 404
    assert client.get("/console/models/digits/accuracy?hours=0").status_code == 400
