"""The in-memory broker's core: sessions, subscriptions, retained messages, routing, delivery.

Owns ``BrokerCore``: what the package doc says the broker does, without making clients (the
client module imports this one; ``MemoryBroker`` in ``_broker`` adds the factory). Clients are
known only as ``_peer.Peer``.

Does not implement ``Transport`` (``_client.MemoryClient`` does).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edge_agent.common.memory._peer import MemoryPublishHandle, Peer
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.common.transport import split_shared, topic_matches
from edge_agent.errors import NotConnectedError

__all__ = ["BrokerCore"]


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
    client: Peer | None = None  # the connected client, if any
    gone_at: float | None = None  # broker clock at the disconnect


class BrokerCore:
    """The broker without its client factory (``MemoryBroker`` adds it); see the package doc.

    Clients reach it through ``connect_peer``, ``disconnect_peer``, ``subscribe_peer`` and
    ``publish_from``; it reaches them through ``Peer``.

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
        self._clients: list[Peer] = []
        self._published: Counter[tuple[str, int, bool]] = Counter()
        self.running = True

    # ------------------------------------------------------------------ clients
    def attach(self, peer: Peer) -> None:
        """Know ``peer`` from now on (``stop`` drops it, ``start`` reconnects it)."""
        with self._lock:
            self._clients.append(peer)

    # ------------------------------------------------------------------ broker lifecycle
    def stop(self) -> None:
        """The broker goes away: every connection drops (no wills: it is the broker that
        died); sessions and retained messages are forgotten unless ``persistence``."""
        with self._lock:
            self.running = False
            for c in self._clients:
                if c.connected:
                    self.disconnect_peer(c, will=False, pending=True)
            if not self._persistence:
                self._sessions.clear()
                self._retained.clear()

    def start(self) -> None:
        """The broker is back: every client that wants a connection reconnects now."""
        with self._lock:
            self.running = True
            waiting = [c for c in self._clients if c.wants_connection and not c.connected]
        for c in waiting:
            self.connect_peer(c)

    # ------------------------------------------------------------------ inspection
    def retained(self, topic: str) -> Message | None:
        """The retained message of ``topic`` (None if there is none)."""
        with self._lock:
            q = self._retained.get(topic)
            return q.message if q is not None else None

    def published(self) -> dict[tuple[str, int, bool], int]:
        """How many messages were published (wills included) per ``(topic, qos, retain)`` as
        the publisher sent them (subscribers see the QoS lowered to theirs, and ``retain``
        only on retained copies): what a test checks publishers against ``TOPIC_SPECS`` with."""
        with self._lock:
            return dict(self._published)

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
            client.deliver(message)
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

    def _next(self, *, peek: bool = False) -> tuple[Peer, Message] | None:
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

    # ------------------------------------------------------------------ for clients (``Peer``)
    def connect_peer(self, c: Peer) -> bool:
        """Accept ``c`` (False: the broker is down); then ``c`` makes its subscriptions."""
        with self._lock:
            if not self.running:
                c.count("connect_failures")
                return False
            now = self._clock()
            s = self._sessions.get(c.client_id)
            if s is not None and s.client is not None:  # a second connection takes over
                self.disconnect_peer(s.client, will=True, pending=False)
                s = self._sessions.get(c.client_id)
            if s is not None and s.gone_at is not None and now - s.gone_at >= s.expiry:
                s = None
            if s is None or c.clean_start:
                s = _Session(c.client_id, c.session_expiry)
                self._sessions[c.client_id] = s
            s.expiry, s.client, s.gone_at = c.session_expiry, c, None
            c.session_accepted()
        c.after_connect()
        return True

    def disconnect_peer(self, c: Peer, *, will: bool, pending: bool) -> None:
        """Drop ``c``'s connection; ``will``: publish its last will; ``pending``: it reconnects
        when the broker is back (not after a ``drop``, which needs ``reconnect``)."""
        with self._lock:
            s = self._sessions.get(c.client_id)
            if s is None or s.client is not c:
                c.session_ended(pending)
                return
            s.client, s.gone_at = None, self._clock()
            s.queue = deque(q for q in s.queue if q.message.qos > 0)
            if s.expiry == 0:
                del self._sessions[c.client_id]
            c.session_ended(pending)
            if will and c.will is not None:
                w = c.will
                self._route(w.topic, w.payload, w.qos, w.retain, w.properties)

    def subscribe_peer(self, c: Peer, filter_: str, qos: int) -> None:
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

    def publish_from(
        self,
        c: Peer,
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
        self._published[(topic, qos, retain)] += 1
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
