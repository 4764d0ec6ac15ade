"""The in-memory broker's client: one session, implementing ``Transport``.

Owns ``MemoryClient``: what ``edge_agent.common.transport.Transport`` asks of a session
(connect, publish, subscribe, request/response, stats), done against a ``BrokerCore``, plus
what only a test does (``drop``, ``reconnect``), and the ``Peer`` side the broker calls.

Does not route or queue messages (the broker core does) and makes no connection of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.common.memory._core import BrokerCore
from edge_agent.common.memory._peer import MemoryPublishHandle, Peer
from edge_agent.common.mqtt_types import Handler, Message, MessageProperties, MqttStats
from edge_agent.common.transport import (
    PublishHandle,
    Transport,
    topic_matches,
    valid_filter,
    valid_topic,
)
from edge_agent.errors import (
    NotConnectedError,
    PublishError,
    SubscribeError,
    TransportError,
    TransportTimeoutError,
)
from edge_agent.wire.telemetry import StatusMessage
from edge_agent.wire.topics import TOPIC_SPECS

__all__ = ["MemoryClient"]

log = logging.getLogger("edge_agent.common.memory")
#: The status topic's QoS and retain flag (online/offline messages and the last will).
_STATUS = TOPIC_SPECS["status"]


class MemoryClient:
    """One session with a ``MemoryBroker``; implements ``Transport``. Thread-safe.

    Beyond ``Transport``: ``drop`` (the connection breaks: the broker publishes the will) and
    ``reconnect`` (what the paho adapter's network thread does after its backoff).
    """

    def __init__(
        self,
        broker: BrokerCore,
        client_id: str,
        *,
        clean_start: bool,
        session_expiry: int,
        status_topic: str | None,
        agent_version: str,
        clock: Callable[[], float],
    ) -> None:
        """Use ``MemoryBroker.client``; ``broker`` is the broker it belongs to."""
        self._broker = broker
        self.client_id = client_id
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self._status_topic = status_topic
        self._agent_version = agent_version
        self._clock = clock
        self._lock = threading.RLock()
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._pending: dict[bytes, list[Message]] = {}
        self._stats: dict[str, int] = dict.fromkeys(MqttStats.__dataclass_fields__, 0)
        self._connected = False
        self._started = False
        self._closed = False
        self._pending_connect = False
        self.will: Message | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        """True while the broker has accepted the current session."""
        return self._connected

    @property
    def wants_connection(self) -> bool:
        """Started, not closed, and not dropped (a dropped client waits for ``reconnect``)."""
        return self._started and not self._closed and self._pending_connect

    def connect(self) -> None:
        """Connect now if the broker runs, else when it starts.

        Raises:
            TransportError: already started or closed.
        """
        if self._started or self._closed:
            raise TransportError("connect() may be called once per client")
        self._started = True
        self._pending_connect = True
        self._broker.connect_peer(self)

    def reconnect(self) -> None:
        """Connect again after ``drop`` (no-op while connected).

        Raises:
            TransportError: never connected, or closed.
        """
        if not self._started or self._closed:
            raise TransportError("reconnect() needs a started, open client")
        self._pending_connect = True
        if not self._connected:
            self._broker.connect_peer(self)

    def wait_connected(self, timeout: float) -> None:
        """Return if connected (connections are made synchronously here).

        Raises:
            TransportTimeoutError: not connected (the broker is down, or the client dropped).
        """
        if not self._connected:
            raise TransportTimeoutError(f"not connected to the broker within {timeout}s")

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``offline``/``shutdown`` (a device), disconnect cleanly. Never raises."""
        if self._closed:
            return
        if self._connected and self._status_topic is not None:
            with contextlib.suppress(TransportError):
                shutdown = self._status("offline", "shutdown")
                self.publish(self._status_topic, shutdown, _STATUS.qos, _STATUS.retain)
        self._closed = True
        self._pending_connect = False
        self._broker.disconnect_peer(self, will=False, pending=False)

    def drop(self) -> None:
        """The connection breaks (no DISCONNECT): the broker publishes the will, if any."""
        self._pending_connect = False
        self._broker.disconnect_peer(self, will=True, pending=False)

    def stats(self) -> MqttStats:
        """A snapshot of the counters."""
        with self._lock:
            return MqttStats(**self._stats)

    # ------------------------------------------------------------------ publishing
    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> PublishHandle:
        """Hand a message to the broker (delivered by the next ``pump``).

        Raises:
            NotConnectedError: no live session.
            PublishError: a bad topic, QoS or payload.
        """
        if not self._connected:
            self.count("publish_errors")
            raise NotConnectedError(f"cannot publish to {topic}: not connected")
        if not valid_topic(topic) or qos not in (0, 1, 2) or not isinstance(payload, bytes):
            self.count("publish_errors")
            raise PublishError(f"cannot publish to {topic!r}: bad topic, QoS or payload")
        try:
            return self._broker.publish_from(self, topic, payload, qos, retain, properties)
        except NotConnectedError:
            self.count("publish_errors")
            raise

    def wait_published(self, handle: PublishHandle, timeout: float) -> None:
        """Return at once: the broker took every message ``publish`` returned a handle for.

        Raises:
            PublishError: ``handle`` is not from an in-memory client.
        """
        if not isinstance(handle, MemoryPublishHandle):
            raise PublishError(f"not a handle of this transport: {handle!r}")

    # ------------------------------------------------------------------ subscribing
    def subscribe(self, filter_: str, handler: Handler, qos: int = 1, timeout: float = 5.0) -> None:
        """Route messages matching ``filter_`` to ``handler`` (on the pumping thread).

        Made at once when connected (retained messages are queued), else on connect.

        Raises:
            SubscribeError: an invalid filter or QoS.
        """
        if not valid_filter(filter_) or qos not in (0, 1, 2):
            raise SubscribeError(f"the broker refused the subscription to {filter_!r}")
        with self._lock:
            self._handlers[filter_] = (handler, qos)
        if self._connected:
            try:
                self._broker.subscribe_peer(self, filter_, qos)
            except NotConnectedError:
                return  # dropped meanwhile; made again on connect

    # ------------------------------------------------------------------ request/response
    def request(self, topic: str, payload: bytes, response_topic: str, timeout: float) -> Message:
        """Publish a request and pump until the response with its correlation data came.

        Raises:
            NotConnectedError: no live session.
            PublishError: the request could not be queued.
            SubscribeError: the response topic cannot be subscribed.
            TransportTimeoutError: idle without an answer (or, ``blocking``, none in time).
        """
        with self._lock:
            covered = any(topic_matches(f, response_topic) for f in self._handlers)
        if not covered:
            self.subscribe(response_topic, lambda _m: None)
        correlation = uuid.uuid4().bytes
        slot: list[Message] = []
        with self._lock:
            self._pending[correlation] = slot
        try:
            props = MessageProperties(
                response_topic=response_topic,
                correlation_data=correlation,
                message_expiry=max(1, math.ceil(timeout)),
            )
            self.publish(topic, payload, qos=1, properties=props)
            if not self._broker.pump_until(lambda: bool(slot), timeout):
                raise TransportTimeoutError(f"no response on {response_topic} in {timeout}s")
            return slot[0]
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    # ------------------------------------------------------------------ broker side (``Peer``)
    def session_accepted(self) -> None:
        """The broker accepted the session: connected, the will armed (a device)."""
        with self._lock:
            self._connected = True
            self._stats["connects"] += 1
            if self._status_topic is not None:
                lost = self._status("offline", "connection_lost")
                self.will = Message(self._status_topic, lost, _STATUS.qos, _STATUS.retain)

    def after_connect(self) -> None:
        """After the broker accepted the session: the online status, then every subscription."""
        if self._status_topic is not None:
            try:
                online = self._status("online", "connected")
                self.publish(self._status_topic, online, _STATUS.qos, _STATUS.retain)
            except TransportError:
                return
        with self._lock:
            filters = [(f, q) for f, (_h, q) in self._handlers.items()]
        for f, _q in filters:
            try:
                self._broker.subscribe_peer(self, f, 1)  # as the paho adapter: QoS 1 on connect
            except NotConnectedError:
                return

    def session_ended(self, pending: bool) -> None:
        """The connection is gone; ``pending``: reconnect when the broker is back."""
        with self._lock:
            if self._connected:
                self._stats["disconnects"] += 1
            self._connected = False
            if not pending:
                self._pending_connect = False

    def deliver(self, message: Message) -> None:
        """Dispatch one delivered message: a pending request's answer, else every handler."""
        correlation = message.properties.correlation_data
        with self._lock:
            slot = self._pending.get(correlation) if correlation is not None else None
            handlers = [
                h for f, (h, _q) in self._handlers.items() if topic_matches(f, message.topic)
            ]
        if slot is not None:
            slot.append(message)
            return
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                self.count("handler_errors")
                log.exception("memory-transport handler for %s failed", message.topic)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the ``MqttStats`` counters."""
        with self._lock:
            self._stats[name] += n

    def _status(self, state: str, reason: str) -> bytes:
        return StatusMessage(
            device_id=self.client_id,
            state=state,
            at=self._clock(),
            reason=reason,
            agent_version=self._agent_version,
        ).to_bytes()


if TYPE_CHECKING:  # mypy proves here that MemoryClient implements the seam and the peer side

    def _is_a_transport(client: MemoryClient) -> Transport:
        return client

    def _is_a_peer(client: MemoryClient) -> Peer:
        return client
