"""The in-memory broker behind ``Transport``: retained, shared, QoS 1 sessions, wills, requests.

Table tests of the behaviour fleet code relies on (the topic-matching rules have their own
property test, ``tests/property/test_property_topic_match.py``, and are checked against real
Mosquitto in ``tests/integration/test_memory_broker_vs_mosquitto.py``). No threads, no sleeps:
publishing queues, ``pump`` delivers; time is a ``FakeClock``.
"""

from __future__ import annotations

import pytest

from clock import FakeClock
from edge_agent.common.memory import MemoryBroker, MemoryClient
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.common.transport import Transport
from edge_agent.errors import (
    NotConnectedError,
    PublishError,
    SubscribeError,
    TransportError,
    TransportTimeoutError,
)
from edge_agent.wire.telemetry import StatusMessage


class Inbox:
    """A handler that records what arrives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(clock: FakeClock) -> MemoryBroker:
    return MemoryBroker(clock=clock)


def connected(broker: MemoryBroker, client_id: str, **kw: object) -> MemoryClient:
    c = broker.client(client_id, **kw)  # type: ignore[arg-type]
    c.connect()
    return c


def test_the_memory_client_is_a_transport(broker: MemoryBroker) -> None:
    t: Transport = broker.client("dev-a")  # mypy checks the protocol here
    assert not t.connected
    t.connect()
    t.wait_connected(0)
    assert t.connected
    assert t.stats().connects == 1


# --------------------------------------------------------------------------- retained
@pytest.mark.parametrize(
    ("published", "expected"),
    [
        ([b"v1"], [b"v1"]),  # set
        ([b"v1", b"v2"], [b"v2"]),  # replaced
        ([b"v1", b""], []),  # cleared by an empty payload
        ([b"v1", b"", b"v3"], [b"v3"]),  # set again after a clear
    ],
)
def test_retained_set_replace_clear(
    broker: MemoryBroker, published: list[bytes], expected: list[bytes]
) -> None:
    pub = connected(broker, "srv.server")
    for payload in published:
        pub.publish("edgefleet/devices/dev-a/desired", payload, 1, True)
    broker.pump()
    late = Inbox()
    sub = connected(broker, "dev-a")
    sub.subscribe("edgefleet/devices/+/desired", late)
    broker.pump()
    assert late.payloads == expected
    assert all(m.retain for m in late.messages)
    kept = broker.retained("edgefleet/devices/dev-a/desired")
    assert (kept.payload if kept else None) == (expected[0] if expected else None)


def test_live_copies_are_not_retained_and_every_subscribe_resends_the_retained(
    broker: MemoryBroker,
) -> None:
    pub = connected(broker, "srv.server")
    inbox = Inbox()
    sub = connected(broker, "dev-a")
    sub.subscribe("edgefleet/devices/dev-a/desired", inbox)
    pub.publish("edgefleet/devices/dev-a/desired", b"d1", 1, True)
    broker.pump()
    assert [(m.payload, m.retain) for m in inbox.messages] == [(b"d1", False)]
    sub.subscribe("edgefleet/devices/dev-a/desired", inbox)  # again: the retained copy
    broker.pump()
    assert [(m.payload, m.retain) for m in inbox.messages][1:] == [(b"d1", True)]


def test_an_empty_retained_publish_reaches_current_subscribers(broker: MemoryBroker) -> None:
    pub = connected(broker, "srv.server")
    inbox = Inbox()
    connected(broker, "dev-a").subscribe("edgefleet/devices/dev-a/status", inbox)
    pub.publish("edgefleet/devices/dev-a/status", b"", 1, True)
    broker.pump()
    assert inbox.payloads == [b""]
    assert broker.retained("edgefleet/devices/dev-a/status") is None


@pytest.mark.parametrize("retained_to_shared", [False, True])
def test_retained_messages_reach_a_shared_subscription_only_as_mosquitto_does(
    clock: FakeClock, retained_to_shared: bool
) -> None:
    """MQTT 5 sends a new shared subscription no retained message; Mosquitto 2.0 does."""
    broker = MemoryBroker(clock=clock, retained_to_shared=retained_to_shared)
    pub = connected(broker, "dev-a")
    pub.publish("edgefleet/devices/dev-a/reported", b"r", 1, True)
    shared = Inbox()
    connected(broker, "srv.server").subscribe("$share/g/edgefleet/devices/+/reported", shared)
    broker.pump()
    assert [(m.payload, m.retain) for m in shared.messages] == (
        [(b"r", True)] if retained_to_shared else []
    )


def test_retained_messages_never_reach_a_shared_subscription(broker: MemoryBroker) -> None:
    pub = connected(broker, "dev-a")
    pub.publish("edgefleet/devices/dev-a/reported", b"r", 1, True)
    shared, plain = Inbox(), Inbox()
    srv = connected(broker, "srv.server")
    srv.subscribe("$share/fleet/edgefleet/devices/+/reported", shared)
    broker.pump()
    assert shared.messages == []
    srv2 = connected(broker, "srv2.server")
    srv2.subscribe("edgefleet/devices/+/reported", plain)
    broker.pump()
    assert plain.payloads == [b"r"]


# --------------------------------------------------------------------------- shared
def test_one_member_of_a_group_gets_each_message(broker: MemoryBroker) -> None:
    members = [Inbox() for _ in range(3)]
    for i, inbox in enumerate(members):
        connected(broker, f"w{i}.server").subscribe(
            "$share/fleet/edgefleet/devices/+/telemetry", inbox
        )
    other_group = Inbox()
    connected(broker, "x.server").subscribe(
        "$share/other/edgefleet/devices/+/telemetry", other_group
    )
    dev = connected(broker, "dev-a")
    for n in range(9):
        dev.publish("edgefleet/devices/dev-a/telemetry", b"%d" % n)
    broker.pump()
    got = sorted(p for inbox in members for p in inbox.payloads)
    assert got == sorted(b"%d" % n for n in range(9))  # each exactly once within the group
    assert all(len(inbox.messages) == 3 for inbox in members)  # round robin
    assert len(other_group.messages) == 9  # every group gets its own copy


def test_a_shared_group_skips_a_member_that_is_away(broker: MemoryBroker) -> None:
    a, b = Inbox(), Inbox()
    wa = connected(broker, "wa.server")
    wa.subscribe("$share/fleet/edgefleet/devices/+/events", a)
    connected(broker, "wb.server").subscribe("$share/fleet/edgefleet/devices/+/events", b)
    wa.drop()
    dev = connected(broker, "dev-a")
    for n in range(4):
        dev.publish("edgefleet/devices/dev-a/events", b"%d" % n)
    broker.pump()
    assert a.messages == []
    assert b.payloads == [b"0", b"1", b"2", b"3"]


def test_overlapping_plain_filters_each_get_a_copy(broker: MemoryBroker) -> None:
    """One copy per matching subscription (Mosquitto 2.0 does the same); the client hands every
    copy to every matching handler, as the paho adapter does."""
    h1, h2 = Inbox(), Inbox()
    sub = connected(broker, "srv.server")
    sub.subscribe("edgefleet/devices/+/telemetry", h1)
    sub.subscribe("edgefleet/#", h2)
    dev = connected(broker, "dev-a")
    dev.publish("edgefleet/devices/dev-a/telemetry", b"t")
    assert broker.pump() == 2
    assert h1.payloads == h2.payloads == [b"t", b"t"]
    dev.publish("edgefleet/devices/dev-a/events", b"e")
    assert broker.pump() == 1
    assert h2.payloads[-1] == b"e"
    assert h1.payloads == [b"t", b"t"]


# --------------------------------------------------------------------------- sessions, QoS 1
@pytest.mark.parametrize(
    ("qos", "clean_start", "expiry", "how", "expected"),
    [
        (1, False, 3600, "drop", [b"m"]),  # persistent session: redelivered after reconnect
        (1, False, 3600, "undelivered", [b"m"]),  # queued, not yet delivered at the drop
        (0, False, 3600, "drop", []),  # QoS 0 is not kept for an absent client
        (0, False, 3600, "undelivered", []),
        (1, True, 3600, "drop", []),  # clean start discards the session
        (1, False, 0, "drop", []),  # session expiry 0: the session ends with the connection
        (1, False, 10, "expired", []),  # the session expired before the reconnect
    ],
)
def test_qos1_redelivery_after_reconnect(
    broker: MemoryBroker,
    clock: FakeClock,
    qos: int,
    clean_start: bool,
    expiry: int,
    how: str,
    expected: list[bytes],
) -> None:
    inbox = Inbox()
    dev = broker.client("dev-a", clean_start=clean_start, session_expiry=expiry)
    dev.subscribe("edgefleet/devices/dev-a/ack", inbox, qos=1)
    dev.connect()
    srv = connected(broker, "srv.server")
    if how == "undelivered":
        srv.publish("edgefleet/devices/dev-a/ack", b"m", qos)
        dev.drop()
    else:
        dev.drop()
        srv.publish("edgefleet/devices/dev-a/ack", b"m", qos)
    if how == "expired":
        clock.advance(expiry)
    broker.pump()
    assert inbox.messages == []  # nothing reaches a client that is away
    dev.reconnect()
    broker.pump()
    assert inbox.payloads == expected
    assert dev.stats().connects == 2
    assert dev.stats().disconnects == 1


def test_delivered_messages_are_not_delivered_again(broker: MemoryBroker) -> None:
    inbox = Inbox()
    dev = connected(broker, "dev-a")
    dev.subscribe("edgefleet/devices/dev-a/ack", inbox)
    connected(broker, "srv.server").publish("edgefleet/devices/dev-a/ack", b"once")
    broker.pump()
    dev.drop()
    dev.reconnect()
    broker.pump()
    assert inbox.payloads == [b"once"]


def test_message_expiry_counts_down_and_drops(broker: MemoryBroker, clock: FakeClock) -> None:
    inbox = Inbox()
    dev = broker.client("dev-a")
    dev.subscribe("edgefleet/devices/dev-a/blocks/resp", inbox)
    dev.connect()
    dev.drop()
    srv = connected(broker, "srv.server")
    for n, expiry in enumerate((5, 20)):
        props = MessageProperties(message_expiry=expiry)
        srv.publish("edgefleet/devices/dev-a/blocks/resp", b"%d" % n, 1, properties=props)
    clock.advance(8)
    dev.reconnect()
    broker.pump()
    assert inbox.payloads == [b"1"]
    assert inbox.messages[0].properties.message_expiry == 12


def test_broker_restart_without_persistence_forgets_and_clients_reconnect(
    broker: MemoryBroker,
) -> None:
    inbox = Inbox()
    dev = broker.client("dev-a")
    dev.subscribe("edgefleet/devices/dev-a/desired", inbox)
    dev.connect()
    srv = connected(broker, "srv.server")
    srv.publish("edgefleet/devices/dev-a/desired", b"d", 1, True)
    broker.pump()
    broker.stop()
    assert not dev.connected
    assert not srv.connected
    with pytest.raises(NotConnectedError):
        srv.publish("edgefleet/devices/dev-a/desired", b"x")
    broker.start()
    assert dev.connected
    assert srv.connected
    assert srv.stats().connects == 2
    assert broker.retained("edgefleet/devices/dev-a/desired") is None
    srv.publish("edgefleet/devices/dev-a/desired", b"d2", 1, True)  # the server republishes
    broker.pump()
    assert inbox.payloads == [b"d", b"d2"]  # the client subscribed again on its own


def test_a_persistent_broker_keeps_retained_messages_and_sessions(clock: FakeClock) -> None:
    broker = MemoryBroker(clock=clock, persistence=True)
    inbox = Inbox()
    dev = broker.client("dev-a")
    dev.subscribe("edgefleet/devices/dev-a/ack", inbox)
    dev.connect()
    srv = connected(broker, "srv.server")
    srv.publish("edgefleet/devices/dev-a/desired", b"d", 1, True)
    srv.publish("edgefleet/devices/dev-a/ack", b"queued")  # not pumped before the stop
    broker.stop()
    broker.start()
    retained = broker.retained("edgefleet/devices/dev-a/desired")
    assert retained is not None
    assert retained.payload == b"d"
    broker.pump()
    assert inbox.payloads == [b"queued"]


def test_connect_while_the_broker_is_down_happens_when_it_starts(broker: MemoryBroker) -> None:
    broker.stop()
    dev = broker.client("dev-a")
    dev.connect()
    assert not dev.connected
    assert dev.stats().connect_failures == 1
    with pytest.raises(TransportTimeoutError):
        dev.wait_connected(0.1)
    broker.start()
    assert dev.connected


@pytest.mark.parametrize("expiry", [0, 3600])
def test_a_second_connection_with_the_same_client_id_takes_the_session_over(
    broker: MemoryBroker, expiry: int
) -> None:
    old_inbox, new_inbox = Inbox(), Inbox()
    old = broker.client("dev-a", announce_status=True, session_expiry=expiry)
    old.subscribe("edgefleet/devices/dev-a/ack", old_inbox)
    old.connect()
    new = broker.client("dev-a", session_expiry=expiry)
    new.subscribe("edgefleet/devices/dev-a/ack", new_inbox)
    new.connect()
    assert not old.connected
    assert new.connected
    assert _status(broker.retained("edgefleet/devices/dev-a/status")) == (
        "offline",
        "connection_lost",
    )
    connected(broker, "srv.server").publish("edgefleet/devices/dev-a/ack", b"a")
    broker.pump()
    assert old_inbox.messages == []
    assert new_inbox.payloads == [b"a"]


# --------------------------------------------------------------------------- status and will
def _status(message: Message | None) -> tuple[str, str]:
    assert message is not None
    s = StatusMessage.from_bytes(message.payload)
    return s.state, s.reason


@pytest.mark.parametrize(
    ("end", "expected"),
    [("drop", ("offline", "connection_lost")), ("close", ("offline", "shutdown"))],
)
def test_device_status_online_then_will_or_shutdown(
    broker: MemoryBroker, end: str, expected: tuple[str, str]
) -> None:
    topic = "edgefleet/devices/dev-a/status"
    dev = connected(broker, "dev-a", announce_status=True)
    assert _status(broker.retained(topic)) == ("online", "connected")
    getattr(dev, end)()
    assert _status(broker.retained(topic)) == expected


def test_server_identity_announces_nothing(broker: MemoryBroker) -> None:
    srv = connected(broker, "fleet.server")
    srv.drop()
    assert broker.pending() == 0
    assert srv.will is None


# --------------------------------------------------------------------------- errors, request
def test_refusals_raise_transport_errors(broker: MemoryBroker) -> None:
    c = broker.client("dev-a")
    with pytest.raises(NotConnectedError):
        c.publish("edgefleet/devices/dev-a/telemetry", b"x")
    assert c.stats().publish_errors == 1
    c.connect()
    with pytest.raises(TransportError):
        c.connect()
    for topic in ("edgefleet/+/x", "edgefleet/#", ""):
        with pytest.raises(PublishError):
            c.publish(topic, b"x")
    for filter_ in ("edgefleet/a#", "edgefleet/#/x", "$share//edgefleet/x", "$share/g"):
        with pytest.raises(SubscribeError):
            c.subscribe(filter_, Inbox())
    with pytest.raises(PublishError):
        c.wait_published(_ForeignHandle(), 1.0)  # not a handle of this transport
    c.close()
    c.close()  # idempotent
    with pytest.raises(TransportError):
        c.reconnect()


class _ForeignHandle:
    mid = 7

    def is_published(self) -> bool:
        return True


def test_a_failing_handler_is_counted_and_delivery_goes_on(broker: MemoryBroker) -> None:
    inbox = Inbox()

    def boom(_m: Message) -> None:
        raise RuntimeError("handler bug")

    c = connected(broker, "srv.server")
    c.subscribe("edgefleet/devices/+/telemetry", boom)
    c.subscribe("edgefleet/devices/+/events", inbox)
    dev = connected(broker, "dev-a")
    dev.publish("edgefleet/devices/dev-a/telemetry", b"t")
    dev.publish("edgefleet/devices/dev-a/events", b"e")
    broker.pump()
    assert c.stats().handler_errors == 1
    assert inbox.payloads == [b"e"]


def test_request_response_with_correlation_data(broker: MemoryBroker) -> None:
    srv = connected(broker, "srv.server")

    def answer(m: Message) -> None:
        p = m.properties
        assert p.response_topic is not None
        srv.publish(
            p.response_topic,
            b"re:" + m.payload,
            properties=MessageProperties(correlation_data=p.correlation_data),
        )

    srv.subscribe("$share/fleet/edgefleet/devices/+/fallback/req", answer)
    dev = connected(broker, "dev-a")
    resp = "edgefleet/devices/dev-a/fallback/resp/t1"
    reply = dev.request("edgefleet/devices/dev-a/fallback/req", b"q", resp, timeout=2.0)
    assert reply.payload == b"re:q"
    assert broker.subscriptions("dev-a") == {resp: 1}
    srv.drop()  # nobody answers any more: idle means timed out, at once
    with pytest.raises(TransportTimeoutError):
        dev.request("edgefleet/devices/dev-a/fallback/req", b"q2", resp, timeout=30.0)


def test_publish_handles_are_acknowledged_at_once(broker: MemoryBroker) -> None:
    c = connected(broker, "srv.server")
    h1 = c.publish("edgefleet/devices/dev-a/blocks/resp", b"b", 1)
    h0 = c.publish("edgefleet/devices/dev-a/ack", b"a", 0)
    assert h1.is_published()
    assert h0.is_published()
    assert h1.mid > 0
    assert h0.mid == 0
    c.wait_published(h1, 0.0)
