"""The transport seam: what fleet code may ask of an MQTT v5 session, and MQTT's filter rules.

Owns: ``Transport``, the protocol every consumer of a broker session is typed against (the
device sync loop, the cloud-fallback client, the gateway, block delivery, the fallback worker),
``PublishHandle`` (a queued publish you can wait on), and the pure MQTT topic rules both
implementations and their tests rely on: ``valid_topic``, ``valid_filter``, ``split_shared``
and ``topic_matches`` (``+``/``#`` wildcards, ``$``-topics, ``$share/<group>/...``).

Two implementations: ``edge_agent.common.mqtt.MqttClient`` (paho, a real broker) and
``edge_agent.common.memory.MemoryClient`` (an in-memory broker for tests, the way httpx
ships ``MockTransport`` beside its real transport). Connection state is read, not pushed:
``connected`` and the ``connects``/``disconnects`` counters of ``stats()``, which consumers poll
on their own threads (a callback would run on the network thread, where waiting deadlocks).

Does not open connections, hold state or import paho.
"""

from __future__ import annotations

from typing import Protocol

from edge_agent.common.mqtt_types import Handler, Message, MessageProperties, MqttStats

__all__ = [
    "PublishHandle",
    "Transport",
    "split_shared",
    "topic_matches",
    "valid_filter",
    "valid_topic",
]

_MAX_TOPIC_BYTES = 65_535
_SHARE = "$share/"


class PublishHandle(Protocol):
    """A queued publish; pass it to ``Transport.wait_published``."""

    @property
    def mid(self) -> int:
        """The MQTT packet id (0 for QoS 0)."""
        ...

    def is_published(self) -> bool:
        """True once the broker acknowledged it (at once for QoS 0 once sent)."""
        ...


class Transport(Protocol):
    """One MQTT v5 session. Every method raises ``TransportError`` (or a subclass), never a
    library's return code; see ``edge_agent.common.mqtt.MqttClient`` for each method's contract.
    """

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the current session."""
        ...

    def connect(self) -> None:
        """Start connecting (returns at once); subscriptions made before are made on connect.

        Raises:
            TransportError: already started or closed.
        """
        ...

    def wait_connected(self, timeout: float) -> None:
        """Block until connected.

        Raises:
            TransportTimeoutError: not connected within ``timeout`` seconds.
        """
        ...

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (a device first publishes its ``offline`` status). Never raises."""
        ...

    def stats(self) -> MqttStats:
        """Counters since the session was created (``connects`` tells of every reconnect)."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> PublishHandle:
        """Queue a message; never waits.

        Raises:
            NotConnectedError: no live session.
            PublishError: the message was refused (bad topic or QoS, queue full).
        """
        ...

    def wait_published(self, handle: PublishHandle, timeout: float) -> None:
        """Block until the broker acknowledged ``handle``.

        Raises:
            TransportTimeoutError: no acknowledgement in time.
            PublishError: the message was given up.
        """
        ...

    def subscribe(self, filter_: str, handler: Handler, qos: int = 1, timeout: float = 5.0) -> None:
        """Route messages matching ``filter_`` to ``handler``; (re)made on every connect.

        Raises:
            SubscribeError: the broker refused the subscription.
            TransportTimeoutError: no SUBACK in time.
        """
        ...

    def request(self, topic: str, payload: bytes, response_topic: str, timeout: float) -> Message:
        """Publish a request and wait for the response carrying its correlation data.

        Raises:
            NotConnectedError: no live session.
            PublishError: the request could not be queued.
            SubscribeError: the response topic cannot be subscribed.
            TransportTimeoutError: no response in time.
        """
        ...


# ---------------------------------------------------------------------- topic rules (pure)
def valid_topic(topic: str) -> bool:
    """Whether ``topic`` may be published to: non-empty, no wildcard, no NUL, <= 65,535 bytes."""
    return (
        isinstance(topic, str)
        and 0 < len(topic.encode("utf-8", "surrogatepass")) <= _MAX_TOPIC_BYTES
        and not any(c in topic for c in "+#\x00")
    )


def split_shared(filter_: str) -> tuple[str | None, str]:
    """``(group, filter)`` of ``$share/<group>/<filter>``; ``(None, filter_)`` for a plain one.

    Does not validate (see ``valid_filter``); a ``$share/`` filter without a second ``/``
    comes back whole, as a plain filter (which ``valid_filter`` then refuses).
    """
    if filter_.startswith(_SHARE):
        parts = filter_.split("/", 2)
        if len(parts) == 3:
            return parts[1], parts[2]
    return None, filter_


def _valid_plain(filter_: str) -> bool:
    if not filter_ or "\x00" in filter_:
        return False
    levels = filter_.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def valid_filter(filter_: str) -> bool:
    """Whether ``filter_`` may be subscribed to.

    ``+`` and ``#`` each fill a whole level, ``#`` only the last; a shared filter needs a
    non-empty group without wildcards and a valid filter after it.
    """
    if not isinstance(filter_, str):
        return False
    if len(filter_.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        return False
    if filter_.startswith(_SHARE) or filter_ == "$share":
        group, rest = split_shared(filter_)
        if group is None or not group or any(c in group for c in "+#"):
            return False
        return _valid_plain(rest)
    return _valid_plain(filter_)


def topic_matches(filter_: str, topic: str) -> bool:
    """Whether a message on ``topic`` matches the subscription ``filter_`` (MQTT 3.1.1/5).

    ``+`` matches exactly one level (an empty one too), ``#`` the rest including none (``a/#``
    matches ``a``); a topic starting with ``$`` is matched by no filter that starts with a
    wildcard; ``$share/<group>/`` is stripped first. An invalid filter matches nothing.
    """
    if not valid_filter(filter_) or not valid_topic(topic):
        return False
    _group, plain = split_shared(filter_)
    f_levels = plain.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
