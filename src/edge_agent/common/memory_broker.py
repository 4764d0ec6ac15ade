"""An in-memory MQTT v5 broker and client behind ``Transport``: the test double of the seam.

Owns: ``MemoryBroker`` (sessions, subscriptions, retained messages, queues) and
``MemoryClient`` (one session; implements ``edge_agent.common.transport.Transport`` like the
paho adapter ``edge_agent.common.mqtt.MqttClient``). Shipped in the package, like httpx's
``MockTransport``, so sync, delivery and ingest logic get fast tests without sockets.

What it does as Mosquitto 2.0 does (``tests/integration/test_memory_broker_vs_mosquitto.py``
checks the topic rules against the real broker):

- topic matching with ``+``/``#``, ``$``-topics, and ``$share/<group>/<filter>``: each message
  goes to one member of a group (round robin over connected members; an offline persistent
  member is queued for only when none is connected);
- one copy per matching subscription of a client (Mosquitto 2.0 sends overlapping
  subscriptions one copy each), plus one per shared group; the client hands every copy to
  every handler whose filter matches (as the paho adapter does);
- retained messages: set, replaced, cleared by an empty payload; sent with ``retain=True`` on
  every subscribe, live copies carry ``retain=False``. A new shared subscription gets none
  (MQTT 5, section 3.3.1.3), unless ``retained_to_shared=True``: Mosquitto 2.0 does send them
  (the integration test pins that down);
- sessions: ``clean_start=False`` with ``session_expiry > 0`` keeps subscriptions and queues
  QoS 1 messages while the client is away (QoS 0 ones are dropped), and what was queued but
  not delivered at a disconnect is delivered after the reconnect; message expiry counts down;
- a device client (``announce_status=True``) publishes its retained ``online`` status on
  connect, ``offline``/``shutdown`` on ``close``, and leaves the ``offline``/``connection_lost``
  will the broker publishes when the connection drops (``drop``), as the paho adapter does.

Delivery is deterministic: publishing only queues; ``MemoryBroker.pump`` delivers everything
queued, oldest first, calling handlers on the caller's thread (a handler may publish: that is
delivered by the same pump). No threads, no sleeps. ``request`` pumps until its answer came;
with no answer once idle it times out at once, unless the broker is ``blocking`` (answers come
from other threads), when it waits on a condition up to the timeout. Thread-safe.

Does not enforce ACLs, message size limits or inflight windows, and has no network: what only
a real broker shows stays in the real-Mosquitto integration tests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from edge_agent.common.mqtt_types import Handler, Message, MessageProperties, MqttStats
from edge_agent.common.transport import (
    PublishHandle,
    Transport,
    split_shared,
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
from edge_agent.wire.topics import Topics

__all__ = ["MemoryBroker", "MemoryClient", "MemoryPublishHandle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryPublishHandle:
    """A publish the in-memory broker has taken: acknowledged at once."""

    mid: int

    def is_published(self) -> bool:
        """Always True: the broker took the message when ``publish`` returned."""
        return True


@dataclass
class _Queued:
    seq: int
    message: Message
    at: float  # broker clock when queued (for message expiry)


@dataclass
class _Session:
    client_id: str
    expiry: int
    subs: dict[str, int] = field(default_factory=dict)  # filter (shared ones whole) -> QoS
    queue: deque[_Queued] = field(default_factory=deque)
    client: MemoryClient | None = None  # the connected client, if any
    gone_at: float | None = None  # broker clock at the disconnect


class MemoryBroker:
    """The broker: make clients with ``client``, deliver with ``pump``; see the module doc.

    Args:
        clock: seconds (session and message expiry); a fake clock in tests.
        persistence: whether sessions and retained messages survive ``stop``/``start``.
        blocking: whether ``request`` and ``pump_until`` wait (on a condition, up to their
            timeout) for messages from other threads once nothing is queued.
        retained_to_shared: whether a new shared subscription gets the retained messages it
            matches, as Mosquitto 2.0 does (MQTT 5 says it gets none).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        persistence: bool = False,
        blocking: bool = False,
        retained_to_shared: bool = False,
    ) -> None:
        self._clock = clock
        self._retained_to_shared = retained_to_shared
        self._persistence = persistence
        self.blocking = blocking
        self._lock = threading.RLock()
        self._activity = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Queued] = {}
        self._seq = itertools.count(1)
        self._mid = itertools.count(1)
        self._rr: dict[tuple[str, str], int] = {}  # (group, filter) -> round-robin position
        self._clients: list[MemoryClient] = []
        self.running = True

    # ------------------------------------------------------------------ clients
    def client(
        self,
        client_id: str,
        *,
        clean_start: bool = False,
        session_expiry: int = 3600,
        announce_status: bool = False,
        prefix: str = "edgefleet",
        agent_version: str = "",
        clock: Callable[[], float] = time.time,
    ) -> MemoryClient:
        """A new client of this broker (not connected yet); arguments as in ``MqttConfig``."""
        c = MemoryClient(
            self,
            client_id,
            clean_start=clean_start,
            session_expiry=session_expiry,
            status_topic=Topics(prefix).device_status(client_id) if announce_status else None,
            agent_version=agent_version,
            clock=clock,
        )
        with self._lock:
            self._clients.append(c)
        return c

    # ------------------------------------------------------------------ broker lifecycle
    def stop(self) -> None:
        """The broker goes away: every connection drops (no wills: it is the broker that
        died); sessions and retained messages are forgotten unless ``persistence``."""
        with self._lock:
            self.running = False
            for c in self._clients:
                if c.connected:
                    self._disconnect(c, will=False, pending=True)
            if not self._persistence:
                self._sessions.clear()
                self._retained.clear()

    def start(self) -> None:
        """The broker is back: every client that wants a connection reconnects now."""
        with self._lock:
            self.running = True
            waiting = [c for c in self._clients if c.wants_connection and not c.connected]
        for c in waiting:
            self._connect(c)

    # ------------------------------------------------------------------ inspection
    def retained(self, topic: str) -> Message | None:
        """The retained message of ``topic`` (None if there is none)."""
        with self._lock:
            q = self._retained.get(topic)
            return q.message if q is not None else None

    def pending(self, client_id: str | None = None) -> int:
        """Messages queued for delivery (for one client's session, or in all)."""
        with self._lock:
            if client_id is not None:
                s = self._sessions.get(client_id)
                return len(s.queue) if s is not None else 0
            return sum(len(s.queue) for s in self._sessions.values())

    def subscriptions(self, client_id: str) -> dict[str, int]:
        """The filters (shared ones whole) and QoS of a client's session at the broker."""
        with self._lock:
            s = self._sessions.get(client_id)
            return dict(s.subs) if s is not None else {}

    # ------------------------------------------------------------------ delivery
    def pump(self, limit: int | None = None) -> int:
        """Deliver queued messages to connected clients, oldest first, until none is left (or
        ``limit`` were delivered); handlers run on this thread. Returns how many were."""
        n = 0
        while limit is None or n < limit:
            with self._lock:
                item = self._next()
                if item is None:
                    return n
                client, message = item
            client._receive(message)
            n += 1
        return n

    def pump_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Pump until ``predicate()`` holds. When idle: False at once, or (``blocking``) wait
        for messages from other threads up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if predicate():
                return True
            with self._lock:
                if self._next(peek=True) is not None:
                    continue
                left = deadline - time.monotonic()
                if not self.blocking or left <= 0:
                    return False
                self._activity.wait(left)

    def _next(self, *, peek: bool = False) -> tuple[MemoryClient, Message] | None:
        """The oldest deliverable message (removed unless ``peek``). Caller holds the lock."""
        now = self._clock()
        best: _Session | None = None
        for s in self._sessions.values():
            if s.client is None:
                continue
            while s.queue and _expired(s.queue[0], now):
                s.queue.popleft()
            if s.queue and (best is None or s.queue[0].seq < best.queue[0].seq):
                best = s
        if best is None or best.client is None:
            return None
        q = best.queue[0] if peek else best.queue.popleft()
        return best.client, _aged(q, now)

    # ------------------------------------------------------------------ client operations
    def _connect(self, c: MemoryClient) -> bool:
        """Accept ``c`` (False: the broker is down); then ``c`` makes its subscriptions."""
        with self._lock:
            if not self.running:
                c._count("connect_failures")
                return False
            now = self._clock()
            s = self._sessions.get(c.client_id)
            if s is not None and s.client is not None:  # a second connection takes over
                self._disconnect(s.client, will=True, pending=False)
                s = self._sessions.get(c.client_id)
            if s is not None and s.gone_at is not None and now - s.gone_at >= s.expiry:
                s = None
            if s is None or c.clean_start:
                s = _Session(c.client_id, c.session_expiry)
                self._sessions[c.client_id] = s
            s.expiry, s.client, s.gone_at = c.session_expiry, c, None
            c._connected_now()
        c._on_connect()
        return True

    def _disconnect(self, c: MemoryClient, *, will: bool, pending: bool) -> None:
        """Drop ``c``'s connection; ``will``: publish its last will; ``pending``: it reconnects
        when the broker is back (not after a ``drop``, which needs ``reconnect``)."""
        with self._lock:
            s = self._sessions.get(c.client_id)
            if s is None or s.client is not c:
                c._disconnected_now(pending)
                return
            s.client, s.gone_at = None, self._clock()
            s.queue = deque(q for q in s.queue if q.message.qos > 0)
            if s.expiry == 0:
                del self._sessions[c.client_id]
            c._disconnected_now(pending)
            if will and c.will is not None:
                topic, payload = c.will
                self._route(topic, payload, 1, True, None)

    def _subscribe(self, c: MemoryClient, filter_: str, qos: int) -> None:
        with self._lock:
            s = self._sessions.get(c.client_id)
            if s is None or s.client is not c:
                raise NotConnectedError(f"cannot subscribe to {filter_}: not connected")
            s.subs[filter_] = qos
            group, plain = split_shared(filter_)
            if group is not None and not self._retained_to_shared:
                return  # MQTT 5: no retained messages for a new shared subscription
            now = self._clock()
            for topic, q in sorted(self._retained.items(), key=lambda kv: kv[1].seq):
                if topic_matches(plain, topic) and not _expired(q, now):
                    m = replace(_aged(q, now), qos=min(q.message.qos, qos), retain=True)
                    s.queue.append(_Queued(next(self._seq), m, q.at))
            self._activity.notify_all()

    def _publish(
        self,
        c: MemoryClient,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: MessageProperties | None,
    ) -> MemoryPublishHandle:
        with self._lock:
            s = self._sessions.get(c.client_id)
            if s is None or s.client is not c:
                raise NotConnectedError(f"cannot publish to {topic}: not connected")
            self._route(topic, payload, qos, retain, properties)
            return MemoryPublishHandle(next(self._mid) if qos else 0)

    def _route(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: MessageProperties | None,
    ) -> None:
        """Store (retain) and queue one message for every matching subscription. Holds the lock."""
        now = self._clock()
        props = properties or MessageProperties()
        if retain:
            if payload:
                msg = Message(topic, bytes(payload), qos, True, props)
                self._retained[topic] = _Queued(next(self._seq), msg, now)
            else:
                self._retained.pop(topic, None)
        live = Message(topic, bytes(payload), qos, False, props)
        groups: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
        for s in list(self._sessions.values()):
            for f, sub_qos in s.subs.items():
                if not topic_matches(f, topic):
                    continue
                group, plain = split_shared(f)
                if group is None:  # one copy per matching subscription, as Mosquitto 2.0
                    self._enqueue(s, replace(live, qos=min(qos, sub_qos)), now)
                else:
                    groups.setdefault((group, plain), []).append((s, sub_qos))
        for key in sorted(groups):
            members = groups[key]
            online = [m for m in members if m[0].client is not None]
            pool = online or members
            i = self._rr.get(key, 0) % len(pool)
            self._rr[key] = i + 1
            s, sub_qos = pool[i]
            self._enqueue(s, replace(live, qos=min(qos, sub_qos)), now)
        self._activity.notify_all()

    def _enqueue(self, s: _Session, message: Message, now: float) -> None:
        if s.client is None and message.qos == 0:
            return  # QoS 0 is not kept for an absent client
        s.queue.append(_Queued(next(self._seq), message, now))


def _expired(q: _Queued, now: float) -> bool:
    expiry = q.message.properties.message_expiry
    return expiry is not None and now - q.at >= expiry


def _aged(q: _Queued, now: float) -> Message:
    """The message as delivered: its expiry interval counts down while it waits."""
    expiry = q.message.properties.message_expiry
    if expiry is None:
        return q.message
    left = max(1, math.ceil(expiry - (now - q.at)))
    return replace(q.message, properties=replace(q.message.properties, message_expiry=left))


class MemoryClient:
    """One session with a ``MemoryBroker``; implements ``Transport``. Thread-safe.

    Beyond ``Transport``: ``drop`` (the connection breaks: the broker publishes the will) and
    ``reconnect`` (what the paho adapter's network thread does after its backoff).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        clean_start: bool,
        session_expiry: int,
        status_topic: str | None,
        agent_version: str,
        clock: Callable[[], float],
    ) -> None:
        """Use ``MemoryBroker.client``."""
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
        self.will: tuple[str, bytes] | None = None

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
        self._broker._connect(self)

    def reconnect(self) -> None:
        """Connect again after ``drop`` (no-op while connected).

        Raises:
            TransportError: never connected, or closed.
        """
        if not self._started or self._closed:
            raise TransportError("reconnect() needs a started, open client")
        self._pending_connect = True
        if not self._connected:
            self._broker._connect(self)

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
                self.publish(self._status_topic, self._status("offline", "shutdown"), 1, True)
        self._closed = True
        self._pending_connect = False
        self._broker._disconnect(self, will=False, pending=False)

    def drop(self) -> None:
        """The connection breaks (no DISCONNECT): the broker publishes the will, if any."""
        self._pending_connect = False
        self._broker._disconnect(self, will=True, pending=False)

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
            self._count("publish_errors")
            raise NotConnectedError(f"cannot publish to {topic}: not connected")
        if not valid_topic(topic) or qos not in (0, 1, 2) or not isinstance(payload, bytes):
            self._count("publish_errors")
            raise PublishError(f"cannot publish to {topic!r}: bad topic, QoS or payload")
        try:
            return self._broker._publish(self, topic, payload, qos, retain, properties)
        except NotConnectedError:
            self._count("publish_errors")
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
                self._broker._subscribe(self, filter_, qos)
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

    # ------------------------------------------------------------------ broker side
    def _connected_now(self) -> None:
        with self._lock:
            self._connected = True
            self._stats["connects"] += 1
            if self._status_topic is not None:
                self.will = (self._status_topic, self._status("offline", "connection_lost"))

    def _on_connect(self) -> None:
        """After the broker accepted the session: the online status, then every subscription."""
        if self._status_topic is not None:
            try:
                self.publish(self._status_topic, self._status("online", "connected"), 1, True)
            except TransportError:
                return
        with self._lock:
            filters = [(f, q) for f, (_h, q) in self._handlers.items()]
        for f, _q in filters:
            try:
                self._broker._subscribe(self, f, 1)  # as the paho adapter: QoS 1 on connect
            except NotConnectedError:
                return

    def _disconnected_now(self, pending: bool) -> None:
        with self._lock:
            if self._connected:
                self._stats["disconnects"] += 1
            self._connected = False
            if not pending:
                self._pending_connect = False

    def _receive(self, message: Message) -> None:
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
                self._count("handler_errors")
                log.exception("memory-transport handler for %s failed", message.topic)

    def _count(self, name: str, n: int = 1) -> None:
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


if TYPE_CHECKING:  # mypy proves here that MemoryClient implements the seam

    def _is_a_transport(client: MemoryClient) -> Transport:
        return client
