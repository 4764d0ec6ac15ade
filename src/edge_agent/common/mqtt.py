"""The MQTT v5 adapter over paho: the only module in ``edge_agent`` that imports paho.

Owns ``MqttClient``, the real implementation of ``edge_agent.common.transport.Transport`` (the
in-memory one for tests is ``edge_agent.common.memory.MemoryClient``): the connection
to the broker (TLS with the client certificate, a persistent session, ``TCP_NODELAY``),
reconnection with exponential backoff and *full jitter* (paho's own backoff has none, so a
fleet would reconnect in lockstep after a broker restart; this module runs its own network
thread around ``Client.loop`` instead of ``loop_start``), the retained ``online`` status and
its ``offline`` last will, publishing, subscriptions whose handlers run on a worker thread fed
by a bounded queue (so a handler may publish and wait without deadlocking paho), and a small
MQTT v5 request/response helper (response topic + correlation data), and
``switch_identity``: reconnect with a renewed certificate and key, keeping the old pair loaded
unless the broker accepts the new one.

Every public method raises :class:`TransportError` (or a subclass), never a paho return code.
Does not own the paho-free value types (``MqttConfig``, ``Message``, ``MessageProperties``,
``MqttStats``, ``backoff_delay``: import them from ``edge_agent.common.mqtt_types``), the
transport protocol (``edge_agent.common.transport``) or the errors (``edge_agent.errors``);
``PahoPublishHandle`` and the conversions to and from paho's properties stay here because they
touch paho. Does not know what the payloads mean (callers do), which topics a role subscribes
to (``edge_agent.wire.topics.Topics`` does) or persist anything: a QoS 1 message that was
never acknowledged lives only in paho's memory; end-to-end acknowledgement is the outbox's job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.common.mqtt_types import (
    Handler,
    Message,
    MessageProperties,
    MqttConfig,
    MqttStats,
    backoff_delay,
)
from edge_agent.common.transport import PublishHandle, Transport
from edge_agent.errors import (
    NotConnectedError,
    PublishError,
    SubscribeError,
    TransportError,
    TransportTimeoutError,
)
from edge_agent.wire.telemetry import StatusMessage
from edge_agent.wire.topics import TOPIC_SPECS, Topics

__all__ = ["MqttClient", "PahoPublishHandle"]

log = logging.getLogger(__name__)

#: The status topic's QoS and retain flag (its online/offline messages and the last will).
_STATUS = TOPIC_SPECS["status"]
_LOOP_TIMEOUT = 0.2  # seconds paho's loop() blocks in select; bounds how fast close() returns


class PahoPublishHandle:
    """A queued paho publish (a ``transport.PublishHandle``); see ``MqttClient.wait_published``."""

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        """The MQTT packet id."""
        return self._info.mid

    def is_published(self) -> bool:
        """True once the broker acknowledged it (PUBACK for QoS 1)."""
        return self._info.is_published()


def _to_paho(props: MessageProperties | None) -> Properties | None:
    if props is None:
        return None
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if props.response_topic is not None:
        p.ResponseTopic = props.response_topic
    if props.correlation_data is not None:
        p.CorrelationData = props.correlation_data
    if props.message_expiry is not None:
        p.MessageExpiryInterval = props.message_expiry
    if props.content_type is not None:
        p.ContentType = props.content_type
    if props.user_properties:
        p.UserProperty = list(props.user_properties)
    return p


def _from_paho(msg: paho.MQTTMessage) -> Message:
    p = msg.properties
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        properties=MessageProperties(
            response_topic=getattr(p, "ResponseTopic", None),
            correlation_data=getattr(p, "CorrelationData", None),
            message_expiry=getattr(p, "MessageExpiryInterval", None),
            content_type=getattr(p, "ContentType", None),
            user_properties=tuple(getattr(p, "UserProperty", ()) or ()),
        ),
    )


def _no_op_socket_callback(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """Present so paho leaves socket writes to the network thread (see ``MqttClient``)."""


def _matches(filter_: str, topic: str) -> bool:
    if filter_.startswith("$share/"):
        filter_ = filter_.split("/", 2)[2] if filter_.count("/") >= 2 else filter_
    return paho.topic_matches_sub(filter_, topic)


class MqttClient:
    """One MQTT v5 session (a ``Transport``). Thread-safe; the module docstring says which
    threads run what."""

    def __init__(self, config: MqttConfig, *, clock: Callable[[], float] = time.time) -> None:
        """Prepare (but do not open) the connection.

        Raises:
            ConfigError: invalid configuration.
            TransportError: the TLS material cannot be loaded.
        """
        config.validate()
        self._config = config
        self._clock = clock
        self._status_topic = (
            Topics(config.prefix).device_status(config.device_id)
            if config.announce_status
            else None
        )
        self._rand = random.Random()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._abandon = threading.Event()
        self._attempt = 0
        self._stats: dict[str, int] = dict.fromkeys(MqttStats.__dataclass_fields__, 0)
        self._handlers: dict[str, Handler] = {}
        self._suback: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._pending: dict[bytes, tuple[threading.Event, list[Message]]] = {}
        self._inbox: queue.Queue[tuple[Handler, Message] | None] = queue.Queue(config.inbox_size)
        self._net: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # Our own context (what paho's tls_set builds: TLS client, CA-verified, hostname
        # checked), kept so ``switch_identity`` can load another certificate chain into it.
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._identity = (Path(config.cert_path), Path(config.key_path))
        self._reconnected = threading.Event()
        try:
            self._tls.load_verify_locations(str(config.ca_path))
            self._tls.load_cert_chain(str(config.cert_path), str(config.key_path))
            c.tls_set_context(self._tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise TransportError(f"cannot load TLS material: {exc}") from exc
        c.on_pre_connect = self._on_pre_connect
        c.on_socket_open = self._on_socket_open
        # paho writes to the socket from the *caller's* thread when it runs no loop_start()
        # thread of its own; an SSL socket written from two threads corrupts the stream. A
        # registered write callback (paho's hook for external event loops) makes it queue
        # instead and wake our network thread, the only thread that touches the socket.
        c.on_socket_register_write = _no_op_socket_callback
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._client = c

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        """Start the network and handler threads; returns at once (see ``wait_connected``).

        Raises:
            TransportError: already started or closed.
        """
        if self._net is not None or self._stop.is_set():
            raise TransportError("connect() may be called once per client")
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._config.session_expiry
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive,
            clean_start=self._config.clean_start,
            properties=props,
        )
        self._worker = threading.Thread(target=self._work, name="mqtt-handlers", daemon=True)
        self._net = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._worker.start()
        self._net.start()

    def wait_connected(self, timeout: float) -> None:
        """Block until the broker has accepted the session.

        Raises:
            TransportTimeoutError: not connected within ``timeout`` seconds.
        """
        if not self._connected.wait(timeout):
            raise TransportTimeoutError(f"not connected to the broker within {timeout}s")

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the current session."""
        return self._connected.is_set()

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``offline``/``shutdown``, disconnect cleanly and stop both threads.

        Never raises; a broker that is gone only makes the close less graceful.
        """
        if self._stop.is_set():
            return
        if self._connected.is_set() and self._status_topic is not None:
            with contextlib.suppress(TransportError):
                handle = self.publish(
                    self._status_topic,
                    self._status("offline", "shutdown"),
                    _STATUS.qos,
                    _STATUS.retain,
                )
                self.wait_published(handle, timeout)
        self._stop.set()
        if self._connected.is_set():
            self._client.disconnect()  # the network loop flushes it, then returns
        else:
            self._abandon.set()
        if self._net is not None:
            self._net.join(timeout)
            if self._net.is_alive():  # DISCONNECT not flushed in time: drop the socket
                self._abandon.set()
                self._net.join(timeout)
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._inbox.put(None, timeout=timeout)
            self._worker.join(timeout)
        self._connected.clear()

    def switch_identity(self, cert_path: Path, key_path: Path, timeout: float) -> None:
        """Reconnect with another certificate and key (a renewal); keep them if accepted.

        The session is closed cleanly (no last will) and opened again with the new pair; the
        persistent session keeps the subscriptions. If the broker has not accepted the new
        pair within ``timeout`` seconds, the previous pair is loaded back (the next reconnect
        uses it) and the error is raised. Blocks; never call it from a message handler.

        Raises:
            TransportError: the new files cannot be loaded (nothing changed).
            TransportTimeoutError: not connected with the new pair in time (old pair restored).
        """
        self._refuse_on_network_thread("switch_identity")
        old_cert, old_key = self._identity
        try:
            self._tls.load_cert_chain(str(cert_path), str(key_path))
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot load the new TLS material: {exc}") from exc
        self._reconnected.clear()
        if self._connected.is_set():
            self._client.disconnect()  # the network thread flushes it and reconnects
        if self._reconnected.wait(timeout) and self._connected.is_set():
            self._identity = (Path(cert_path), Path(key_path))
            return
        try:
            self._tls.load_cert_chain(str(old_cert), str(old_key))
        except (OSError, ValueError) as exc:
            log.error("cannot load the previous TLS material back: %s", exc)
        raise TransportTimeoutError(f"the broker did not accept the new identity in {timeout}s")

    def stats(self) -> MqttStats:
        """A snapshot of the counters."""
        with self._lock:
            return MqttStats(**self._stats)

    def tcp_nodelay(self) -> bool:
        """Whether ``TCP_NODELAY`` is set on the live socket (read back with getsockopt).

        Raises:
            NotConnectedError: there is no socket.
        """
        sock = self._client.socket()
        if sock is None or not isinstance(sock, socket.socket):
            raise NotConnectedError("no socket")
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # ------------------------------------------------------------------ publishing
    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> PahoPublishHandle:
        """Queue a message; never waits (safe inside handlers and paho callbacks).

        A raised error does not prove the message was not sent: a connection lost during the
        call may still deliver it after the reconnect (at-least-once).

        Raises:
            NotConnectedError: no live session.
            PublishError: paho refused the message (bad topic or QoS, queue full, lost).
        """
        if not self._connected.is_set():
            self._count("publish_errors")
            raise NotConnectedError(f"cannot publish to {topic}: not connected")
        try:
            info = self._client.publish(topic, payload, qos, retain, _to_paho(properties))
        except (ValueError, TypeError) as exc:
            self._count("publish_errors")
            raise PublishError(f"cannot publish to {topic}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("publish_errors")
            cls = NotConnectedError if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN else PublishError
            raise cls(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        return PahoPublishHandle(info)

    def wait_published(self, handle: PublishHandle, timeout: float) -> None:
        """Block until the broker acknowledged ``handle``. Not from the network thread.

        Raises:
            TransportTimeoutError: no acknowledgement in time, or called on paho's thread.
            PublishError: paho gave up on the message, or ``handle`` is not one of paho's.
        """
        self._refuse_on_network_thread("wait_published")
        if not isinstance(handle, PahoPublishHandle):
            raise PublishError(f"not a handle of this transport: {handle!r}")
        try:
            handle._info.wait_for_publish(timeout)
        except (ValueError, RuntimeError) as exc:
            raise PublishError(str(exc)) from exc
        if not handle.is_published():
            raise TransportTimeoutError(f"message {handle.mid} not acknowledged in {timeout}s")

    # ------------------------------------------------------------------ subscribing
    def subscribe(self, filter_: str, handler: Handler, qos: int = 1, timeout: float = 5.0) -> None:
        """Route messages matching ``filter_`` to ``handler`` (on the handler thread).

        When connected, waits for the SUBACK; otherwise the subscription is made on connect.
        A broker ACL may still filter what is delivered (Mosquitto acknowledges anyway).

        Raises:
            SubscribeError: the broker refused the subscription.
            TransportTimeoutError: no SUBACK in time, or called on paho's thread.
        """
        self._refuse_on_network_thread("subscribe")
        with self._lock:
            self._handlers[filter_] = handler
            live = self._connected.is_set()
        if not live:
            return
        done: tuple[threading.Event, list[bool]] = (threading.Event(), [])
        with self._lock:  # hold it so on_subscribe cannot look up the mid before it is stored
            rc, mid = self._client.subscribe(filter_, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback[mid] = done
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # lost the connection meanwhile; on_connect subscribes again
        try:
            if not done[0].wait(timeout):
                raise TransportTimeoutError(f"no SUBACK for {filter_} in {timeout}s")
        finally:
            with self._lock:
                self._suback.pop(mid, None)
        if not done[1][0]:
            raise SubscribeError(f"the broker refused the subscription to {filter_}")

    # ------------------------------------------------------------------ request/response
    def request(self, topic: str, payload: bytes, response_topic: str, timeout: float) -> Message:
        """Publish a request and wait for the response carrying its correlation data.

        The request expires at the broker when the caller stops waiting (message expiry).
        Subscribes to ``response_topic`` unless an existing filter already covers it.

        Raises:
            NotConnectedError: no live session.
            PublishError: the request could not be queued.
            SubscribeError: the response topic cannot be subscribed.
            TransportTimeoutError: no response in time, or called on paho's thread.
        """
        self._refuse_on_network_thread("request")
        deadline = time.monotonic() + timeout
        with self._lock:
            covered = any(_matches(f, response_topic) for f in self._handlers)
        if not covered:
            self.subscribe(response_topic, lambda _m: None, timeout=timeout)
        correlation = uuid.uuid4().bytes
        slot: tuple[threading.Event, list[Message]] = (threading.Event(), [])
        with self._lock:
            self._pending[correlation] = slot
        try:
            props = MessageProperties(
                response_topic=response_topic,
                correlation_data=correlation,
                message_expiry=max(1, math.ceil(deadline - time.monotonic())),
            )
            self.publish(topic, payload, qos=1, properties=props)
            if not slot[0].wait(max(0.0, deadline - time.monotonic())):
                raise TransportTimeoutError(f"no response on {response_topic} in {timeout}s")
            return slot[1][0]
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    # ------------------------------------------------------------------ threads
    def _run(self) -> None:
        """Network thread: connect, run paho's loop, back off with full jitter, repeat."""
        while not self._stop.is_set():
            try:
                self._client.reconnect()
            except OSError as exc:  # refused, unreachable, TLS rejected (SSLError is OSError)
                self._count("connect_failures")
                log.info("mqtt connect to %s failed: %s", self._config.host, exc)
            else:
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._abandon.is_set():
                    rc = self._client.loop(_LOOP_TIMEOUT)
            if self._stop.is_set():
                break
            with self._lock:
                attempt = self._attempt
                self._attempt += 1
            delay = backoff_delay(
                attempt, self._config.reconnect_min, self._config.reconnect_max, self._rand.random
            )
            self._stop.wait(delay)

    def _work(self) -> None:
        """Handler thread: may block, publish and wait; paho's thread never does."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            handler, message = item
            try:
                handler(message)
            except Exception:
                self._count("handler_errors")
                log.exception("mqtt handler for %s failed", message.topic)

    def _refuse_on_network_thread(self, what: str) -> None:
        if threading.current_thread() is self._net:
            raise TransportTimeoutError(f"{what} would deadlock on paho's network thread")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _status(self, state: str, reason: str) -> bytes:
        return StatusMessage(
            device_id=self._config.device_id,
            state=state,
            at=self._clock(),
            reason=reason,
            agent_version=self._config.agent_version,
        ).to_bytes()

    # ------------------------------------------------------------------ paho callbacks
    def _on_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        # The will's "at" is the time of this connection attempt (see status.schema.json).
        if self._status_topic is None:
            return
        client.will_set(
            self._status_topic,
            self._status("offline", "connection_lost"),
            qos=_STATUS.qos,
            retain=_STATUS.retain,
        )

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        # paho never sets it: without it each request/response waits on delayed ACKs.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:
            log.warning("cannot set TCP_NODELAY: %s", exc)

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._count("connect_failures")
            log.warning("mqtt broker refused the connection: %s", reason)
            return
        with self._lock:
            self._attempt = 0
            self._stats["connects"] += 1
            filters = list(self._handlers)
            self._connected.set()
        self._reconnected.set()
        # Queue only; waiting here would deadlock the network thread.
        if self._status_topic is not None:
            online = self._status("online", "connected")
            client.publish(self._status_topic, online, _STATUS.qos, _STATUS.retain)
        for f in filters:
            client.subscribe(f, 1)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._lock:
            if self._connected.is_set():
                self._stats["disconnects"] += 1
            self._connected.clear()
        log.info("mqtt disconnected: %s", reason)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: Any, _props: Any
    ) -> None:
        with self._lock:
            waiter = self._suback.get(mid)
        if waiter is not None:
            waiter[1].append(not any(r.is_failure for r in reasons))
            waiter[0].set()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        message = _from_paho(msg)
        correlation = message.properties.correlation_data
        with self._lock:
            slot = self._pending.get(correlation) if correlation is not None else None
            handlers = [h for f, h in self._handlers.items() if _matches(f, message.topic)]
        if slot is not None:
            slot[1].append(message)
            slot[0].set()
            return
        for handler in handlers:
            try:
                self._inbox.put_nowait((handler, message))
            except queue.Full:
                self._count("drops")


if TYPE_CHECKING:  # mypy proves here that MqttClient implements the seam

    def _is_a_transport(client: MqttClient) -> Transport:
        return client
