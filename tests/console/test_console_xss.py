"""Device-supplied text is hostile: a script-injection payload in every field a device (or a
bundle's author, or a failing request) can put on a console page comes out escaped, on every
page that shows it.

Values are stored straight into the registry where the wire parsers would have refused them
(model names in reports and events are labels there): the console must not rely on that.
Device ids cannot carry a payload (the registry refuses them, asserted below).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from console_world import ConsoleWorld, login
from starlette.testclient import TestClient

from edge_agent.wire.telemetry import Event, StatusMessage
from fleet_server.accounts.roles import Role
from fleet_server.console.charts import Series, bars_svg, series_svg
from fleet_server.drift.report import ChartPanel
from fleet_server.errors import RegistryError
from fleet_server.registry import _labels
from fleet_server.rollouts.policy import RolloutPolicy, Selector

P = "\"'><script>alert(1)</script><img src=x onerror=alert(1)>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
DEV = "dev-x"


def _payload(tag: str) -> str:
    return f"{tag}{P}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ConsoleWorld]:
    w = ConsoleWorld.open(tmp_path)
    r = w.registry
    r.enroll(DEV, group=_payload("group"), tags={_payload("tagkey"): _payload("tagvalue")})
    w.gateway.status[DEV] = StatusMessage(DEV, "online", 0.0, "connected")
    r.record_reported(
        DEV,
        {
            "agent_version": _payload("agent"),
            "models": {
                _payload("reportedmodel"): {
                    "active": 1,
                    "kept": [1],
                    "assigned": 1,
                    "outcome": "failed",
                    "reason": _payload("error"),
                }
            },
        },
    )
    r.ingest(
        DEV,
        [
            Event(DEV, 1, "drift_alert", 10.0, model=_payload("eventmodel"), version=1,
                  detail=_payload("drift")),
            Event(DEV, 2, "install_failed", 11.0, detail=_payload("eventdetail")),
            Event(DEV, 3, "fallback_breaker_open", 12.0, model="digits",
                  detail=_payload("breaker")),
        ],
    )  # fmt: skip
    r.publish_bundle(
        _payload("bundle"), 1, channel="stable", sha256="1" * 64, length=10,
        targets_sha256="2" * 64, manifest={"provenance": {"author": _payload("provenance")},
                                           "report": {"note": _payload("report")}},
    )  # fmt: skip
    r.publish_bundle(_payload("bundle"), 2, channel="stable", sha256="3" * 64, length=10,
                     targets_sha256="4" * 64)  # fmt: skip
    with r.write_session("test") as s:  # device labels past the parser, as a hostile store
        _labels.replace_source(s, DEV, "device", {_payload("labelkey"): _payload("labelvalue")})
    w.runner.create(
        _payload("bundle"), 2, selector=Selector(group=_payload("group")),
        policy=RolloutPolicy(canary_count=1, min_devices=1), from_version=1,
    )  # fmt: skip
    yield w
    w.close()


@pytest.fixture
def client(world: ConsoleWorld) -> Iterator[TestClient]:
    with TestClient(world.app()) as c:
        login(c, "ada")
        yield c


def _rollout(world: ConsoleWorld) -> str:
    return f"/console/rollouts/{world.runner.rollouts()[0].id}"


def _url(world: ConsoleWorld, page: str) -> str:
    if page == "ROLLOUT":
        return _rollout(world)
    if page == "ACCURACY":
        return f"/console/models/{quote(_payload('bundle'), safe='')}/accuracy"
    return page


# (what carries the payload, the pages that show it)
TABLE = [
    ("group", ["/console/devices", f"/console/devices/{DEV}", "/console/rollouts", "ROLLOUT"]),
    ("tagkey", ["/console/devices", f"/console/devices/{DEV}"]),
    ("tagvalue", ["/console/devices", f"/console/devices/{DEV}"]),
    ("agent", [f"/console/devices/{DEV}"]),
    ("reportedmodel", ["/console/", "/console/devices", f"/console/devices/{DEV}"]),
    ("error", [f"/console/devices/{DEV}"]),
    ("eventmodel", ["/console/", f"/console/devices/{DEV}"]),
    ("drift", ["/console/", f"/console/devices/{DEV}"]),
    ("eventdetail", ["/console/", f"/console/devices/{DEV}"]),
    ("breaker", ["/console/", "/console/fallback", f"/console/devices/{DEV}"]),
    ("bundle", ["/console/", "/console/models", "/console/rollouts", "/console/drift",
                "ROLLOUT", "ACCURACY"]),
    ("provenance", ["/console/models"]),
    ("report", ["/console/models"]),
    ("labelkey", ["/console/devices", f"/console/devices/{DEV}"]),
    ("labelvalue", ["/console/devices", f"/console/devices/{DEV}"]),
]  # fmt: skip


@pytest.mark.parametrize(("field", "pages"), TABLE)
def test_a_payload_in_each_field_is_escaped_on_every_page_that_shows_it(
    client: TestClient, world: ConsoleWorld, field: str, pages: list[str]
) -> None:
    for page in pages:
        url = _url(world, page)
        r = client.get(url)
        assert r.status_code == 200, (field, url, r.text[:300])
        assert P not in r.text, (field, url)
        assert f"{field}&#34;&#39;&gt;{ESCAPED}" in r.text, (field, url)


def test_no_page_carries_the_payload_unescaped(client: TestClient, world: ConsoleWorld) -> None:
    pages = {p for _, ps in TABLE for p in ps} | {"/console/audit"}
    for page in sorted(pages):
        url = _url(world, page)
        text = client.get(url).text
        assert "<script>" not in text, url
        assert "onerror=alert" not in text.replace("onerror=alert(1)&gt;", ""), url


def test_an_error_message_that_echoes_input_is_escaped(client: TestClient) -> None:
    r = client.get("/console/devices", params={"group": "x", "state": P})
    assert r.status_code == 400
    assert P not in r.text
    r = client.get("/console/drift", params={"model": P})
    assert P not in r.text
    assert "<script>" not in r.text


def test_the_audit_log_shows_a_hostile_object_escaped(
    client: TestClient, world: ConsoleWorld
) -> None:
    page = client.get("/console/rollouts").text
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]
    client.post("/console/rollouts", data={"csrf_token": csrf, "model": P, "version": "9",
                "target": "group", "selector": "g"})  # fmt: skip
    r = client.get("/console/audit")
    assert "model:" in r.text
    assert P not in r.text
    assert ESCAPED in r.text


def test_device_ids_cannot_carry_markup(world: ConsoleWorld) -> None:
    with pytest.raises(RegistryError, match="invalid device id"):
        world.registry.enroll(P)


def test_charts_escape_series_names_titles_and_bucket_labels() -> None:
    line = str(series_svg([Series(P, ((0.0, 1.0), (60.0, 2.0)))], title=P))
    panel = ChartPanel(P, None, (0.5, 0.5), (0.4, 0.6), (P, P), {"drifted": True})
    bars = str(bars_svg(panel, title=P))
    for svg in (line, bars):
        assert P not in svg
        assert ESCAPED in svg
        assert "<script" not in svg


def test_a_token_label_and_a_bad_account_form_are_escaped(
    client: TestClient, world: ConsoleWorld
) -> None:
    expires = world.clock.wall() + timedelta(days=1)
    world.accounts.create_token("ada", Role.ADMIN, expires, _payload("tokenlabel"))
    r = client.get("/console/me")
    assert r.status_code == 200
    assert P not in r.text
    assert f"tokenlabel&#34;&#39;&gt;{ESCAPED}" in r.text
    csrf = r.text.split('name="csrf_token" value="')[1].split('"')[0]
    r = client.post("/console/accounts", data={"csrf_token": csrf, "name": P, "role": P})
    assert r.status_code == 400
    assert P not in r.text
    r = client.post("/console/me/tokens", data={"csrf_token": csrf, "label": "ok", "role": P})
    assert P not in r.text
    for page in ("/console/accounts", "/console/audit"):
        text = client.get(page).text
        assert "<script>" not in text, page
