"""MQTT topic names: the one place that spells the fleet's topic tree.

Owns: building every per-device, broadcast and shared-subscription topic under a configurable
prefix, the QoS/retain each topic is published with (``TOPIC_SPECS``), what each role
subscribes to (``ROLE_KINDS``; ``Topics.sync_subscriptions``, ``gateway_subscriptions``,
``fallback_worker_subscriptions``: the sync loop, the gateway and the fallback worker subscribe
from these lists and hard-code no filter), and ``parse``, which maps a received topic back to
``(kind, device_id)`` and refuses anything malformed, and the one rule for a valid prefix
(``Topics.check_prefix``: the agent, the server's config and the broker config all use it).
Publishers take QoS and retain from the topic's spec (``Topics.publication`` /
``publication_of``), never from literals. The layout is the one the broker ACL
enforces (``fleet_server.pki.broker_config``; ``tests/unit/test_role_subscriptions.py`` checks
every role's list against it)::

    <prefix>/devices/<id>/desired            server -> device, retained
    <prefix>/devices/<id>/reported           device -> server, retained
    <prefix>/devices/<id>/status             device -> server, retained, also the last will
    <prefix>/devices/<id>/telemetry          device -> server
    <prefix>/devices/<id>/events             device -> server
    <prefix>/devices/<id>/ack                server -> device (telemetry acknowledgements)
    <prefix>/devices/<id>/blocks/req         device -> server
    <prefix>/devices/<id>/blocks/resp        server -> device
    <prefix>/devices/<id>/fallback/req       device -> server
    <prefix>/devices/<id>/fallback/resp/<c>  server -> device (c: correlation id)
    <prefix>/devices/<id>/commands           server -> device (signed remote commands)
    <prefix>/devices/<id>/commands/resp      device -> server (their answers)
    <prefix>/devices/<id>/upload/req         server -> device (support-bundle block requests)
    <prefix>/devices/<id>/upload/data        device -> server (support-bundle blocks)
    <prefix>/devices/<id>/cert/req           device -> server (certificate renewal)
    <prefix>/devices/<id>/cert/resp          server -> device
    <prefix>/broadcast/<wave>                server -> every device

The device's cloud-fallback client subscribes to one topic of its own below
``fallback_resp_filter`` on its first request (``fallback_resp(device_id, token)``).

Pure: strings in, strings out. Does not subscribe or publish (the consumers do, through
``edge_agent.common.transport.Transport``) and never imports paho.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from edge_agent.errors import ContractError, IdentityError
from edge_agent.ids import validate_device_id

__all__ = [
    "DEVICE_TO_SERVER",
    "KINDS",
    "MAX_PREFIX_LENGTH",
    "MAX_TOPIC_LENGTH",
    "ROLE_KINDS",
    "SERVER_TO_DEVICE",
    "SUBSCRIBE_QOS",
    "TOPIC_SPECS",
    "Publication",
    "RoleKinds",
    "Subscription",
    "TopicRef",
    "TopicSpec",
    "Topics",
]

#: Longest topic ``parse`` accepts (MQTT allows 65,535 bytes; ours are far shorter).
MAX_TOPIC_LENGTH: Final = 512

#: Longest prefix: the longest topic under it (``<prefix>/devices/<63-char id>/fallback/resp/
#: <128-char token>``) stays within ``MAX_TOPIC_LENGTH``, so ``parse`` accepts every topic.
MAX_PREFIX_LENGTH: Final = 256

# Every pattern here is used with ``fullmatch`` (``re.match`` + ``$`` lets a trailing newline in).
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# Correlation ids, wave ids and shared-subscription groups are single levels chosen by the server.
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class TopicSpec:
    """How one kind of topic is used.

    Attributes:
        kind: Stable name (``"telemetry"``, ``"fallback_resp"``, ...).
        suffix: Path below ``<prefix>/devices/<id>/`` (or below ``<prefix>/`` for broadcast).
        publisher: ``"device"`` or ``"server"``.
        qos: QoS the publisher uses.
        retain: Whether the publisher sets the retain flag.
    """

    kind: str
    suffix: str
    publisher: str
    qos: int
    retain: bool

    @property
    def filter_suffix(self) -> str:
        """The suffix as a filter covering every topic of the kind (``fallback/resp/#``: one
        topic per correlation id; else the suffix itself). The broker ACL is written from it."""
        return f"{self.suffix}/#" if self.kind == "fallback_resp" else self.suffix


TOPIC_SPECS: Final[dict[str, TopicSpec]] = {
    s.kind: s
    for s in (
        TopicSpec("desired", "desired", "server", 1, True),
        TopicSpec("reported", "reported", "device", 1, True),
        TopicSpec("status", "status", "device", 1, True),
        TopicSpec("telemetry", "telemetry", "device", 1, False),
        TopicSpec("events", "events", "device", 1, False),
        # QoS 0 on purpose: a lost ack only makes the device resend (the server deduplicates),
        # while a broker that drops a flooding device's queue drops the server's PUBACKs too,
        # and a QoS 1 publisher then stalls every other device's acks behind them.
        TopicSpec("ack", "ack", "server", 0, False),
        TopicSpec("blocks_req", "blocks/req", "device", 1, False),
        TopicSpec("blocks_resp", "blocks/resp", "server", 1, False),
        TopicSpec("fallback_req", "fallback/req", "device", 1, False),
        TopicSpec("fallback_resp", "fallback/resp", "server", 1, False),
        # Remote diagnostics (``edge_agent.trust.command``): QoS 1 and never retained, so a
        # command waits in the device's persistent session (or expires with its message
        # expiry interval) and is delivered once per session, never to a later subscriber.
        TopicSpec("commands", "commands", "server", 1, False),
        TopicSpec("command_resp", "commands/resp", "device", 1, False),
        TopicSpec("upload_req", "upload/req", "server", 1, False),
        TopicSpec("upload_data", "upload/data", "device", 1, False),
        TopicSpec("cert_req", "cert/req", "device", 1, False),
        TopicSpec("cert_resp", "cert/resp", "server", 1, False),
        TopicSpec("broadcast", "broadcast", "server", 1, False),
    )
}
#: Every topic kind ``parse`` can return.
KINDS: Final = tuple(TOPIC_SPECS)
#: Per-device kinds the device publishes (the server subscribes to them).
DEVICE_TO_SERVER: Final = tuple(
    k for k, s in TOPIC_SPECS.items() if s.publisher == "device" and k != "broadcast"
)
#: Per-device kinds the server publishes (the device subscribes to them).
SERVER_TO_DEVICE: Final = tuple(
    k for k, s in TOPIC_SPECS.items() if s.publisher == "server" and k != "broadcast"
)
_BY_SUFFIX: Final = {s.suffix: s.kind for s in TOPIC_SPECS.values() if s.kind != "broadcast"}

#: QoS every role subscribes with (the most it accepts; a QoS 0 publish still arrives at 0).
SUBSCRIBE_QOS: Final = 1


@dataclass(frozen=True)
class RoleKinds:
    """The topic kinds one role subscribes to.

    Attributes:
        shared: kinds subscribed through ``$share/<group>/...`` (several server workers split
            the load; one member of the group gets each message).
        plain: kinds subscribed plainly (retained messages never reach a shared subscription,
            so a role that needs the retained snapshot subscribes without sharing).
    """

    shared: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()


#: What each role subscribes to. ``device``: the device's sync loop (its own per-device topics
#: and every broadcast); ``gateway``: the fleet server's MQTT gateway (ingest, presence,
#: reported state, block requests, command answers and uploads); ``fallback_worker``: the
#: server's cloud-fallback workers; ``renewal``: the fleet CA's certificate renewal service
#: (``fleet_server.pki.renewal``).
ROLE_KINDS: Final[dict[str, RoleKinds]] = {
    "device": RoleKinds(
        plain=("desired", "ack", "blocks_resp", "cert_resp", "broadcast", "commands", "upload_req")
    ),
    # Command answers and upload blocks are plain: the worker that issued a command holds its
    # pending state (``fleet_server.diagnostics``), and every worker ignores answers it never
    # asked for.
    "gateway": RoleKinds(
        shared=("telemetry", "events", "blocks_req"),
        plain=("reported", "status", "command_resp", "upload_data"),
    ),
    "fallback_worker": RoleKinds(shared=("fallback_req",)),
    "renewal": RoleKinds(shared=("cert_req",)),
}


@dataclass(frozen=True)
class Subscription:
    """One filter a role subscribes to.

    Attributes:
        kind: The topic kind it carries (a key of ``TOPIC_SPECS``); the consumer picks its
            handler by it.
        filter: The MQTT filter (``$share/<group>/...`` when shared).
        qos: The subscription's QoS.
        group: The shared-subscription group, None for a plain subscription.
    """

    kind: str
    filter: str
    qos: int = SUBSCRIBE_QOS
    group: str | None = None


class Publication(NamedTuple):
    """Where and how to publish one message: the topic, and its kind's QoS and retain flag
    (from ``TOPIC_SPECS``). ``transport.publish(p.topic, payload, p.qos, p.retain)``."""

    topic: str
    qos: int
    retain: bool


class TopicRef(NamedTuple):
    """A parsed topic: its kind, device id (None for broadcast) and trailing token.

    ``arg`` is the correlation id of ``fallback_resp``, the wave of ``broadcast``, else None.
    """

    kind: str
    device_id: str | None
    arg: str | None


def _check_token(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ContractError(f"invalid {what} {value!r}: 1-128 letters, digits, '.', '_' or '-'")
    return value


def _need(value: str | None, what: str) -> str:
    if value is None:
        raise ContractError(f"this topic kind needs a {what}")
    return value


def _check_device(device_id: str) -> str:
    try:
        return validate_device_id(device_id)
    except IdentityError as exc:
        raise ContractError(str(exc)) from exc


class Topics:
    """The topic tree under one prefix (default ``edgefleet``)."""

    def __init__(self, prefix: str = "edgefleet") -> None:
        """Check and keep the prefix.

        Raises:
            ContractError: as ``check_prefix``.
        """
        self.prefix = self.check_prefix(prefix)
        self._levels = prefix.split("/")

    @staticmethod
    def check_prefix(prefix: str) -> str:
        """Return ``prefix`` if it is a valid topic prefix: the one rule, used by the agent's
        sync config, the server's gateway config and the broker config.

        One or more '/'-separated levels of letters, digits, '.', '_' and '-': so no wildcard
        ('+', '#'), no '$' (system topics), no '%' (the broker ACL's substitutions), no space or
        control character, no empty level (nor a leading or trailing '/'), and at most
        ``MAX_PREFIX_LENGTH`` characters.

        Raises:
            ContractError: the prefix breaks the rule.
        """
        if (
            not isinstance(prefix, str)
            or not 0 < len(prefix) <= MAX_PREFIX_LENGTH
            or not all(_SEGMENT.fullmatch(s) for s in prefix.split("/"))
        ):
            raise ContractError(
                f"invalid topic prefix {prefix!r}: '/'-separated segments of letters, "
                f"digits, '.', '_' and '-', at most {MAX_PREFIX_LENGTH} characters"
            )
        return prefix

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r})"

    # ------------------------------------------------------------------ per device
    def device(self, kind: str, device_id: str) -> str:
        """The topic of ``kind`` for one device (not ``fallback_resp`` or ``broadcast``).

        Raises:
            ContractError: unknown kind, a kind that needs an argument, or a bad device id.
        """
        spec = TOPIC_SPECS.get(kind)
        if spec is None or kind in ("fallback_resp", "broadcast"):
            raise ContractError(f"no plain per-device topic of kind {kind!r}")
        return f"{self.prefix}/devices/{_check_device(device_id)}/{spec.suffix}"

    def device_desired(self, device_id: str) -> str:
        """Retained desired state (server -> device). Raises ContractError (bad id)."""
        return self.device("desired", device_id)

    def device_reported(self, device_id: str) -> str:
        """Retained reported state (device -> server). Raises ContractError (bad id)."""
        return self.device("reported", device_id)

    def device_status(self, device_id: str) -> str:
        """Retained online/offline status and last will. Raises ContractError (bad id)."""
        return self.device("status", device_id)

    def device_telemetry(self, device_id: str) -> str:
        """Telemetry reports and batches. Raises ContractError (bad id)."""
        return self.device("telemetry", device_id)

    def device_events(self, device_id: str) -> str:
        """Lifecycle events. Raises ContractError (bad id)."""
        return self.device("events", device_id)

    def device_ack(self, device_id: str) -> str:
        """Telemetry acknowledgements (server -> device). Raises ContractError (bad id)."""
        return self.device("ack", device_id)

    def blocks_req(self, device_id: str) -> str:
        """Bundle block requests. Raises ContractError (bad id)."""
        return self.device("blocks_req", device_id)

    def blocks_resp(self, device_id: str) -> str:
        """Bundle block responses. Raises ContractError (bad id)."""
        return self.device("blocks_resp", device_id)

    def fallback_req(self, device_id: str) -> str:
        """Cloud fallback requests. Raises ContractError (bad id)."""
        return self.device("fallback_req", device_id)

    def fallback_resp(self, device_id: str, correlation: str) -> str:
        """The response topic of one fallback request.

        Raises:
            ContractError: a bad device id or correlation id.
        """
        base = self.device("fallback_req", device_id).rsplit("/", 1)[0]
        return f"{base}/resp/{_check_token(correlation, 'correlation id')}"

    def fallback_resp_filter(self, device_id: str) -> str:
        """What a device subscribes to for all its fallback responses.

        Raises:
            ContractError: a bad device id.
        """
        return self.fallback_resp(device_id, "x").rsplit("/", 1)[0] + "/#"

    def broadcast(self, wave: str) -> str:
        """The shared topic a rollout wave's blocks are broadcast on.

        Raises:
            ContractError: a bad wave id.
        """
        return f"{self.prefix}/broadcast/{_check_token(wave, 'wave id')}"

    def broadcast_filter(self) -> str:
        """What every device subscribes to for broadcasts."""
        return f"{self.prefix}/broadcast/#"

    # --------------------------------------------------------------- subscriptions
    def all_devices(self, kind: str) -> str:
        """``<prefix>/devices/+/<suffix>``: one kind for every device (consumers, server).

        Raises:
            ContractError: unknown kind or ``broadcast``.
        """
        spec = TOPIC_SPECS.get(kind)
        if spec is None or kind == "broadcast":
            raise ContractError(f"no per-device topic of kind {kind!r}")
        return f"{self.prefix}/devices/+/{spec.filter_suffix}"

    def shared(self, group: str, kind: str) -> str:
        """``$share/<group>/<prefix>/devices/+/<suffix>``: load-balanced over a worker group.

        MQTT v5 never delivers retained messages to shared subscriptions, so a server that
        needs the retained ``reported``/``status`` snapshot also subscribes without sharing.

        Raises:
            ContractError: a bad group name or kind.
        """
        if not isinstance(group, str) or not _TOKEN.fullmatch(group):
            raise ContractError(f"invalid shared-subscription group {group!r}")
        return f"$share/{group}/{self.all_devices(kind)}"

    def sync_subscriptions(self, device_id: str) -> tuple[Subscription, ...]:
        """What a device's sync loop subscribes to (``ROLE_KINDS["device"]``), in order.

        Raises:
            ContractError: a bad device id.
        """
        return tuple(
            Subscription(
                k, self.broadcast_filter() if k == "broadcast" else self.device(k, device_id)
            )
            for k in ROLE_KINDS["device"].plain
        )

    def gateway_subscriptions(self, group: str) -> tuple[Subscription, ...]:
        """What the server's gateway subscribes to (``ROLE_KINDS["gateway"]``): the shared
        kinds over ``group`` first, then the plain ones.

        Raises:
            ContractError: a bad group name.
        """
        return self._server_role("gateway", group)

    def fallback_worker_subscriptions(self, group: str) -> tuple[Subscription, ...]:
        """What the server's fallback workers subscribe to, shared over ``group``.

        Raises:
            ContractError: a bad group name.
        """
        return self._server_role("fallback_worker", group)

    def renewal_subscriptions(self, group: str) -> tuple[Subscription, ...]:
        """What the certificate renewal service subscribes to, shared over ``group``.

        Raises:
            ContractError: a bad group name.
        """
        return self._server_role("renewal", group)

    def _server_role(self, role: str, group: str) -> tuple[Subscription, ...]:
        kinds = ROLE_KINDS[role]
        shared = [Subscription(k, self.shared(group, k), group=group) for k in kinds.shared]
        plain = [Subscription(k, self.all_devices(k)) for k in kinds.plain]
        return (*shared, *plain)

    # ------------------------------------------------------------------ publishing
    @staticmethod
    def spec(kind: str) -> TopicSpec:
        """The spec (publisher, QoS, retain) of ``kind``.

        Raises:
            ContractError: unknown kind.
        """
        spec = TOPIC_SPECS.get(kind)
        if spec is None:
            raise ContractError(f"unknown topic kind {kind!r}")
        return spec

    def publication(
        self, kind: str, device_id: str | None = None, arg: str | None = None
    ) -> Publication:
        """The topic of ``kind`` with the QoS and retain flag its publisher must use.

        ``device_id`` for per-device kinds; ``arg``: the correlation id of ``fallback_resp``,
        the wave id of ``broadcast``.

        Raises:
            ContractError: unknown kind, a missing or bad device id or argument.
        """
        spec = self.spec(kind)
        if kind == "broadcast":
            topic = self.broadcast(_need(arg, "wave id"))
        elif kind == "fallback_resp":
            topic = self.fallback_resp(_need(device_id, "device id"), _need(arg, "correlation id"))
        else:
            topic = self.device(kind, _need(device_id, "device id"))
        return Publication(topic, spec.qos, spec.retain)

    def publication_of(self, topic: str) -> Publication:
        """``topic`` (as built by this tree) with its kind's QoS and retain flag.

        Raises:
            ContractError: as ``parse_ref``.
        """
        spec = TOPIC_SPECS[self.parse_ref(topic).kind]
        return Publication(topic, spec.qos, spec.retain)

    # --------------------------------------------------------------------- parsing
    def parse_ref(self, topic: str) -> TopicRef:
        """Map a concrete topic (as received) to its kind, device id and argument.

        Raises:
            ContractError: not a string, too long, wildcards, '$' or NUL, empty levels, the
                wrong prefix, an invalid device id, an unknown suffix or extra levels.
        """
        if not isinstance(topic, str):
            raise ContractError("topic must be a string")
        if not topic or len(topic) > MAX_TOPIC_LENGTH:
            raise ContractError(f"topic length {len(topic)} outside 1-{MAX_TOPIC_LENGTH}")
        if any(c in topic for c in "+#$\x00"):
            raise ContractError(f"topic {topic[:80]!r} has a wildcard, '$' or NUL")
        levels = topic.split("/")
        n = len(self._levels)
        if levels[:n] != self._levels:
            raise ContractError(f"topic {topic[:80]!r} is not under prefix {self.prefix!r}")
        rest = levels[n:]
        if len(rest) == 2 and rest[0] == "broadcast":
            return TopicRef("broadcast", None, _check_token(rest[1], "wave id"))
        if len(rest) < 3 or rest[0] != "devices":
            raise ContractError(f"topic {topic[:80]!r} is not a device or broadcast topic")
        device_id = _check_device(rest[1])
        tail = rest[2:]
        if len(tail) == 3 and tail[:2] == ["fallback", "resp"]:
            return TopicRef("fallback_resp", device_id, _check_token(tail[2], "correlation id"))
        kind = _BY_SUFFIX.get("/".join(tail))
        if kind is None or kind == "fallback_resp":
            raise ContractError(f"topic {topic[:80]!r} has an unknown device suffix")
        return TopicRef(kind, device_id, None)

    def parse(self, topic: str) -> tuple[str, str | None]:
        """``(kind, device_id)`` of a received topic; device id is None for broadcasts.

        Raises:
            ContractError: as ``parse_ref``.
        """
        ref = self.parse_ref(topic)
        return ref.kind, ref.device_id
