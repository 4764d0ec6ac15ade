"""Topic tree: names match the broker ACL layout, parse round-trips, malformed topics raise."""

from __future__ import annotations

import pytest

from edge_agent.errors import ContractError
from edge_agent.wire.topics import DEVICE_TO_SERVER, SERVER_TO_DEVICE, TOPIC_SPECS, Topics
from fleet_server.pki.broker_config import DEVICE_READ_TOPICS, DEVICE_WRITE_TOPICS

T = Topics("edgefleet")


def test_every_topic_name() -> None:
    d = "dev-1"
    assert T.device_desired(d) == "edgefleet/devices/dev-1/desired"
    assert T.device_reported(d) == "edgefleet/devices/dev-1/reported"
    assert T.device_status(d) == "edgefleet/devices/dev-1/status"
    assert T.device_telemetry(d) == "edgefleet/devices/dev-1/telemetry"
    assert T.device_events(d) == "edgefleet/devices/dev-1/events"
    assert T.device_ack(d) == "edgefleet/devices/dev-1/ack"
    assert T.blocks_req(d) == "edgefleet/devices/dev-1/blocks/req"
    assert T.blocks_resp(d) == "edgefleet/devices/dev-1/blocks/resp"
    assert T.fallback_req(d) == "edgefleet/devices/dev-1/fallback/req"
    assert T.fallback_resp(d, "c0ffee") == "edgefleet/devices/dev-1/fallback/resp/c0ffee"
    assert T.fallback_resp_filter(d) == "edgefleet/devices/dev-1/fallback/resp/#"
    assert T.broadcast("wave-3") == "edgefleet/broadcast/wave-3"
    assert T.broadcast_filter() == "edgefleet/broadcast/#"


def test_multi_level_prefix() -> None:
    t = Topics("acme/plant-1")
    assert t.device_telemetry("d") == "acme/plant-1/devices/d/telemetry"
    assert t.parse("acme/plant-1/devices/d/telemetry") == ("telemetry", "d")
    with pytest.raises(ContractError):
        t.parse("acme/devices/d/telemetry")


def test_layout_matches_the_broker_acl() -> None:
    """Every device-published topic is ACL-writable; every server-published one readable.

    ``ack`` is new: it needs ``pattern read <prefix>/devices/%u/ack`` in the ACL.
    """
    suffix = {k: TOPIC_SPECS[k].suffix for k in TOPIC_SPECS}
    assert {suffix[k] for k in DEVICE_TO_SERVER} == set(DEVICE_WRITE_TOPICS)
    readable = {suffix[k] for k in SERVER_TO_DEVICE} - {"fallback/resp", "ack"}
    # Holds before and after ``ack`` is added to the broker's read list.
    assert readable | {"fallback/resp/#"} == set(DEVICE_READ_TOPICS) - {"ack"}


def test_subscription_filters() -> None:
    assert T.shared("ingest", "telemetry") == "$share/ingest/edgefleet/devices/+/telemetry"
    assert T.all_devices("telemetry") == "edgefleet/devices/+/telemetry"
    assert T.all_devices("fallback_resp") == "edgefleet/devices/+/fallback/resp/#"
    # Moved from the deleted Topics.server_subscriptions / device_subscriptions onto the role
    # lists (same filters): every device -> server kind is consumed by one server role, on
    # the shared filter over its group (retained kinds: plainly), at QoS 1.
    assert {T.shared("workers", k) for k in DEVICE_TO_SERVER} == {
        f"$share/workers/edgefleet/devices/+/{TOPIC_SPECS[k].suffix}" for k in DEVICE_TO_SERVER
    }
    server = [
        *T.gateway_subscriptions("workers"),
        *T.fallback_worker_subscriptions("workers"),
        *T.renewal_subscriptions("workers"),
    ]
    assert {s.kind for s in server} == set(DEVICE_TO_SERVER)
    for sub in server:
        plain = f"edgefleet/devices/+/{TOPIC_SPECS[sub.kind].suffix}"
        assert sub.filter == (f"$share/workers/{plain}" if sub.group == "workers" else plain)
        # Plain: retained kinds, and diagnostics answers (the issuing worker holds the pending
        # command; see ROLE_KINDS).
        assert (
            sub.group == "workers"
            or TOPIC_SPECS[sub.kind].retain
            or sub.kind in ("command_resp", "upload_data")
        )
    subs = {s.filter: s.qos for s in server}
    assert all(q == 1 for q in subs.values())
    # Everything a device reads: its sync loop's list plus the fallback client's responses.
    dev = {s.filter: s.qos for s in T.sync_subscriptions("dev-1")}
    dev[T.fallback_resp_filter("dev-1")] = 1
    assert set(dev) == {
        "edgefleet/devices/dev-1/desired",
        "edgefleet/devices/dev-1/ack",
        "edgefleet/devices/dev-1/blocks/resp",
        "edgefleet/devices/dev-1/cert/resp",
        "edgefleet/devices/dev-1/fallback/resp/#",
        "edgefleet/broadcast/#",
        "edgefleet/devices/dev-1/commands",
        "edgefleet/devices/dev-1/upload/req",
    }


def test_qos_and_retain() -> None:
    retained = {k for k, s in TOPIC_SPECS.items() if s.retain}
    assert retained == {"desired", "reported", "status"}
    # Everything is QoS 1 but the ack, which is QoS 0 by design (a lost ack means a resend).
    assert {k for k, s in TOPIC_SPECS.items() if s.qos != 1} == {"ack"}
    assert TOPIC_SPECS["ack"].qos == 0


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edgefleet/devices/a/desired", ("desired", "a", None)),
        ("edgefleet/devices/a/reported", ("reported", "a", None)),
        ("edgefleet/devices/a/status", ("status", "a", None)),
        ("edgefleet/devices/a/telemetry", ("telemetry", "a", None)),
        ("edgefleet/devices/a/events", ("events", "a", None)),
        ("edgefleet/devices/a/ack", ("ack", "a", None)),
        ("edgefleet/devices/a/blocks/req", ("blocks_req", "a", None)),
        ("edgefleet/devices/a/blocks/resp", ("blocks_resp", "a", None)),
        ("edgefleet/devices/a/fallback/req", ("fallback_req", "a", None)),
        ("edgefleet/devices/a/fallback/resp/x-1", ("fallback_resp", "a", "x-1")),
        ("edgefleet/broadcast/w1", ("broadcast", None, "w1")),
    ],
)
def test_parse(topic: str, expected: tuple[str, str | None, str | None]) -> None:
    assert tuple(T.parse_ref(topic)) == expected
    assert T.parse(topic) == expected[:2]


def test_builders_and_parse_round_trip() -> None:
    for kind in DEVICE_TO_SERVER + SERVER_TO_DEVICE:
        if kind != "fallback_resp":
            assert T.parse(T.device(kind, "dev-9")) == (kind, "dev-9")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "other/devices/a/telemetry",  # wrong prefix
        "edgefleetx/devices/a/telemetry",
        "/edgefleet/devices/a/telemetry",  # leading empty level
        "edgefleet/devices/A/telemetry",  # device ids are lowercase
        "edgefleet/devices/-a/telemetry",
        "edgefleet/devices//telemetry",
        "edgefleet/devices/+/telemetry",  # wildcards
        "edgefleet/devices/a/#",
        "$share/g/edgefleet/devices/a/telemetry",
        "edgefleet/devices/a/telemetry/extra",  # too many levels
        "edgefleet/devices/a/fallback/resp/c/d",
        "edgefleet/devices/a/fallback/resp",  # missing correlation
        "edgefleet/devices/a/fallback/resp/",
        "edgefleet/devices/a/unknown",
        "edgefleet/devices/a",
        "edgefleet/devices",
        "edgefleet/broadcast",
        "edgefleet/broadcast/w/x",
        "edgefleet/devices/a/tele\x00metry",
        "edgefleet/devices/" + "a" * 64 + "/telemetry",  # device id too long
        "edgefleet/broadcast/" + "w" * 600,  # topic too long
    ],
)
def test_parse_rejects_malformed(topic: str) -> None:
    with pytest.raises(ContractError):
        T.parse(topic)


@pytest.mark.parametrize("prefix", ["", "a//b", "a/+", "a/#", "$SYS", "a b", "/a", "a/"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ContractError):
        Topics(prefix)


@pytest.mark.parametrize(
    "call",
    [
        lambda: T.device_telemetry("Bad"),
        lambda: T.device_telemetry("a/b"),
        lambda: T.device_telemetry("+"),
        lambda: T.fallback_resp("a", "x/y"),
        lambda: T.fallback_resp("a", "#"),
        lambda: T.fallback_resp("a", ""),
        lambda: T.broadcast("w+"),
        lambda: T.shared("g/h", "telemetry"),
        lambda: T.shared("g", "nope"),
        lambda: T.device("broadcast", "a"),
        lambda: T.all_devices("broadcast"),
    ],
)
def test_builders_reject_bad_arguments(call: object) -> None:
    with pytest.raises(ContractError):
        call()  # type: ignore[operator]
