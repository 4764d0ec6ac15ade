"""Each role's subscription list (``Topics``) is exactly what the broker ACL lets that role read.

The ACL is the text ``fleet_server.pki.broker_config.render_acl`` writes; ``acl_allows`` reads
it the way Mosquitto checks a SUBSCRIBE (a filter is allowed when a ``read``/``readwrite`` rule
of the user, or a ``pattern`` rule with ``%u`` = the user, covers it level by level). Real
Mosquitto enforcing the same file is tested in ``tests/integration/test_broker_acl.py``.
"""

from __future__ import annotations

import pytest

from edge_agent.common.transport import topic_matches
from edge_agent.wire.topics import DEVICE_TO_SERVER, ROLE_KINDS, TOPIC_SPECS, Topics
from fleet_server.config import GatewayConfig
from fleet_server.pki.broker_config import DEVICE_READ_TOPICS, DEVICE_WRITE_TOPICS, render_acl

PREFIXES = ("edgefleet", "acme/plant-1")
SERVER = "fleet.server"
DEVICE = "dev-1"


def _read_rules(acl: str, user: str) -> list[str]:
    """Every topic the ACL lets ``user`` read (deny rules are not used by these roles)."""
    rules: list[str] = []
    current: str | None = None
    for raw in acl.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = words[1]
        elif words[0] == "pattern" and words[1] in ("read", "readwrite"):
            rules.append(words[2].replace("%u", user))
        elif words[0] == "topic" and current == user and words[1] in ("read", "readwrite"):
            rules.append(words[2])
    return rules


def _covers(rule: str, filter_: str) -> bool:
    """Whether every topic ``filter_`` can match is matched by the ACL topic ``rule``."""
    r, f = rule.split("/"), filter_.split("/")
    for i, level in enumerate(r):
        if level == "#":
            return True
        if i >= len(f) or f[i] == "#":
            return False
        if level != "+" and (f[i] == "+" or level != f[i]):
            return False
    return len(r) == len(f)


def acl_allows(acl: str, user: str, filter_: str) -> bool:
    return any(_covers(rule, filter_) for rule in _read_rules(acl, user))


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_device_reads_exactly_what_the_acl_grants(prefix: str) -> None:
    topics = Topics(prefix)
    acl = render_acl(prefix, SERVER)
    sync = [s.filter for s in topics.sync_subscriptions(DEVICE)]
    assert all(acl_allows(acl, DEVICE, f) for f in sync)
    assert all(s.group is None and s.qos == 1 for s in topics.sync_subscriptions(DEVICE))
    # The sync loop plus the fallback client's responses are every read grant, no more.
    device_reads = [*sync, topics.fallback_resp_filter(DEVICE)]
    granted = {f"{prefix}/devices/{DEVICE}/{t}" for t in DEVICE_READ_TOPICS}
    granted.add(topics.broadcast_filter())
    assert set(device_reads) == granted
    assert acl_allows(acl, DEVICE, topics.fallback_resp(DEVICE, "c0ffee"))
    # Another device's topics and the server's filters are not the device's to read.
    assert not acl_allows(acl, DEVICE, topics.device_desired("dev-2"))
    assert not acl_allows(acl, DEVICE, topics.all_devices("desired"))
    for sub in topics.gateway_subscriptions("fleet"):
        assert not acl_allows(acl, DEVICE, sub.filter)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("workers", [(), ("w1.server",)])
def test_every_server_role_subscription_is_granted_to_every_server_identity(
    prefix: str, workers: tuple[str, ...]
) -> None:
    topics = Topics(prefix)
    acl = render_acl(prefix, SERVER, workers)
    group = GatewayConfig().share_group
    subs = [
        *topics.gateway_subscriptions(group),
        *topics.fallback_worker_subscriptions(group),
        *topics.renewal_subscriptions("fleet-ca"),
    ]
    for identity in (SERVER, *workers):
        for sub in subs:
            assert acl_allows(acl, identity, sub.filter), (identity, sub.filter)
    # A consumer identity gets none of the shared server filters it does not read.
    acl_c = render_acl(prefix, SERVER, consumer_cns=("dash.consumer",))
    blocks = topics.gateway_subscriptions(group)[2]
    assert blocks.kind == "blocks_req"
    assert not acl_allows(acl_c, "dash.consumer", blocks.filter)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_server_consumes_everything_a_device_may_write(prefix: str) -> None:
    topics = Topics(prefix)
    subs = [
        *topics.gateway_subscriptions("fleet"),
        *topics.fallback_worker_subscriptions("fleet"),
        *topics.renewal_subscriptions("fleet-ca"),
    ]
    assert sorted(s.kind for s in subs) == sorted(DEVICE_TO_SERVER)
    for suffix in DEVICE_WRITE_TOPICS:
        topic = f"{prefix}/devices/{DEVICE}/{suffix}"
        matching = [s for s in subs if topic_matches(s.filter, topic)]
        assert len(matching) == 1, topic  # exactly one role takes each device topic


def test_role_kinds_shared_and_plain() -> None:
    """Retained kinds are subscribed plainly: a shared subscription never gets them."""
    t = Topics()
    gateway = t.gateway_subscriptions("fleet")
    assert [(s.kind, s.group) for s in gateway] == [
        ("telemetry", "fleet"),
        ("events", "fleet"),
        ("blocks_req", "fleet"),
        ("reported", None),
        ("status", None),
        ("command_resp", None),
        ("upload_data", None),
    ]
    assert gateway[0].filter == "$share/fleet/edgefleet/devices/+/telemetry"
    assert gateway[3].filter == "edgefleet/devices/+/reported"
    for role in ROLE_KINDS.values():
        assert not any(TOPIC_SPECS[k].retain for k in role.shared)
    assert [s.filter for s in t.fallback_worker_subscriptions("fleet-fallback")] == [
        "$share/fleet-fallback/edgefleet/devices/+/fallback/req"
    ]
    assert [s.filter for s in t.sync_subscriptions(DEVICE)] == [
        "edgefleet/devices/dev-1/desired",
        "edgefleet/devices/dev-1/ack",
        "edgefleet/devices/dev-1/blocks/resp",
        "edgefleet/devices/dev-1/cert/resp",
        "edgefleet/broadcast/#",
        "edgefleet/devices/dev-1/commands",
        "edgefleet/devices/dev-1/upload/req",
    ]
    assert [s.filter for s in t.renewal_subscriptions("fleet-ca")] == [
        "$share/fleet-ca/edgefleet/devices/+/cert/req"
    ]
