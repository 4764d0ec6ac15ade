"""``Registry.device_page`` and ``FleetService.device_page``, on SQLite and PostgreSQL: every
filter is applied in SQL (group, tag, revoked, online ids, reported model version), the count is
of every match, pages are in id order, and a page of the console's device list costs the same
statements for 10,000 devices as for 100."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert

from edge_agent.wire.telemetry import StatusMessage
from fakes import FakeGateway
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import Device
from fleet_server.registry.values import DeviceFilter
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        version = 1 + i % 3
        rows.append(
            {
                "id": f"dev-{i:05d}",
                "group": f"line-{i % 4}",
                "tags": {"site": "a" if i % 2 else "b", "row": str(i % 5)},
                "enrolled_at": T0,
                "revoked_at": T0 if i % 10 == 9 else None,
                "cert_serial": None,
                "epoch": 1,
                "last_seen": None,
                "reported": {"models": {"digits": {"active": version, "kept": []}}}
                if i % 7
                else None,
                "reported_at": T0,
            }
        )
    return rows


def _fill(registry: Registry, n: int, start: int = 0) -> None:
    with registry.write_session("test fleet") as s:
        s.execute(insert(Device), _rows(n, start))


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    r = Registry.open(registry_url)
    r.upgrade()
    yield r
    r.close()


def _expected(n: int, **f: Any) -> list[str]:
    out = []
    for row in _rows(n):
        if "group" in f and row["group"] != f["group"]:
            continue
        if "tag" in f and row["tags"].get(f["tag"][0]) != f["tag"][1]:
            continue
        if "revoked" in f and (row["revoked_at"] is not None) != f["revoked"]:
            continue
        rep = (row["reported"] or {}).get("models", {}).get(f.get("model"))
        if "model" in f and (rep is None or ("version" in f and rep["active"] != f["version"])):
            continue
        out.append(row["id"])
    return out


@pytest.mark.parametrize(
    "f",
    [
        {},
        {"group": "line-2"},
        {"tag": ("site", "a")},
        {"tag": ("row", "3"), "group": "line-1"},
        {"revoked": True},
        {"revoked": False, "group": "line-0"},
        {"model": "digits"},
        {"model": "digits", "version": 2},
        {"model": "digits", "version": 3, "tag": ("site", "b")},
        {"model": "other"},
        {"tag": ("nope", "x")},
    ],
    ids=repr,
)
def test_filters_counts_and_pages_match_the_rows(registry: Registry, f: dict[str, Any]) -> None:
    _fill(registry, 300)
    want = _expected(300, **f)
    got: list[str] = []
    offset = 0
    while True:
        page, total = registry.device_page(DeviceFilter(**f, offset=offset, limit=40))
        assert total == len(want)
        got += [d.id for d in page]
        if len(page) < 40:
            break
        offset += 40
    assert got == want


def test_a_label_selector_filters_in_sql_with_the_other_filters(registry: Registry) -> None:
    for i in range(90):
        registry.enroll(
            f"cam-{i:03d}", group=f"g{i % 2}", tags={"site": f"s{i % 3}", "line": str(i % 5)}
        )
    sel = LabelSelector.parse("site in (s0,s1),line!=4")
    want = [f"cam-{i:03d}" for i in range(90) if i % 3 in (0, 1) and i % 5 != 4 and i % 2 == 1]
    page, total = registry.device_page(DeviceFilter(group="g1", selector=sel, limit=1000))
    assert total == len(want)
    assert [d.id for d in page] == want
    assert registry.device_page(DeviceFilter(selector=LabelSelector.parse("!site")))[1] == 0


def test_hostile_filter_values_are_values_not_sql(registry: Registry) -> None:
    _fill(registry, 20)
    for text in ("' OR 1=1 --", '"); DROP TABLE devices; --', "$.models", "\\", "%", "_"):
        assert registry.device_page(DeviceFilter(group=text)) == ([], 0)
        assert registry.device_page(DeviceFilter(tag=(text, text))) == ([], 0)
        assert registry.device_page(DeviceFilter(model=text))[1] == 0
    assert registry.device_page(DeviceFilter())[1] == 20


def test_online_filter_and_desired_state_come_from_the_service(
    registry: Registry, tmp_path: Path
) -> None:
    _fill(registry, 50)
    online = {f"dev-{i:05d}" for i in (3, 4, 17)}
    gateway = FakeGateway(status={d: StatusMessage(d, "online", 0.0) for d in online})
    gateway.status["dev-00005"] = StatusMessage("dev-00005", "offline", 0.0)
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    service = FleetService(
        registry, BundleLibrary(tmp_path / "bundles", keys.trusted_root()), gateway,
        [keys.signer("online-1")], clock=lambda: datetime.now(UTC), ttl=timedelta(hours=1),
    )  # fmt: skip
    views, total = service.device_page(DeviceFilter(), state="online")
    assert (total, {v.record.id for v in views}) == (3, online)
    assert all(v.online is not None and v.online.state == "online" for v in views)
    views, total = service.device_page(DeviceFilter(limit=100), state="offline")
    assert total == 47
    assert not online & {v.record.id for v in views}


def test_a_page_costs_the_same_statements_for_10000_devices_as_for_100(
    registry: Registry, tmp_path: Path
) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    def page_cost() -> int:
        statements.clear()
        event.listen(registry.engine, "before_cursor_execute", count)
        try:
            registry.device_page(DeviceFilter(tag=("site", "a"), model="digits", version=2))
        finally:
            event.remove(registry.engine, "before_cursor_execute", count)
        return len(statements)

    _fill(registry, 100)
    small = page_cost()
    _fill(registry, 9900, start=100)
    assert page_cost() == small
    reads = [s for s in statements if "FROM devices" in s]
    assert len(reads) == 2  # the page and its count; nothing per device
    assert any("LIMIT" in s.upper() for s in reads)
    assert any("count(" in s.lower() for s in reads)
