"""The MQTT adapter's value types: configuration, messages, properties, counters, backoff.

Owns: ``MqttConfig`` (how a client reaches the broker) and its validation, the paho-free views
of a message (``Message``, ``MessageProperties``), the counters snapshot (``MqttStats``), the
``Handler`` callable type and ``backoff_delay`` (exponential backoff with full jitter).

Does not import paho and holds no connection: the paho client, ``PahoPublishHandle`` and the
conversion to and from paho's properties stay in ``edge_agent.common.mqtt``, the one module that
imports paho; users of these types import them from here. The protocol both clients implement
is ``edge_agent.common.transport.Transport``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import ConfigError

__all__ = [
    "Handler",
    "Message",
    "MessageProperties",
    "MqttConfig",
    "MqttStats",
    "backoff_delay",
]


@dataclass(frozen=True)
class MqttConfig:
    """How a client reaches the broker. Identity (username, client id) is the cert CN.

    ``device_id`` is the client id. A device (``announce_status=True``) also publishes its
    retained ``online`` status and leaves an ``offline`` last will; the fleet server's identity
    (``<label>.server``, not a device id) sets ``announce_status=False``.
    """

    host: str
    port: int
    device_id: str
    ca_path: Path
    cert_path: Path
    key_path: Path
    prefix: str = "edgefleet"
    keepalive: int = 30
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    clean_start: bool = False
    session_expiry: int = 3600  # seconds the broker keeps the session after a disconnect
    inbox_size: int = 1000
    agent_version: str = ""
    announce_status: bool = True

    def validate(self) -> None:
        """Check the values a connection depends on.

        Raises:
            ConfigError: a value is out of range.
        """
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port {self.port} is out of range")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("mqtt reconnect delays need 0 < min <= max")
        if self.keepalive < 5 or self.session_expiry < 0 or self.inbox_size < 1:
            raise ConfigError("mqtt keepalive >= 5, session_expiry >= 0, inbox_size >= 1")


@dataclass(frozen=True)
class MessageProperties:
    """The MQTT v5 properties this adapter exposes (sent and received)."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None  # seconds
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Message:
    """A received message, detached from paho."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: MessageProperties = field(default_factory=MessageProperties)


@dataclass(frozen=True)
class MqttStats:
    """Counters since the client was created."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    drops: int = 0  # incoming messages dropped because the handler queue was full
    publish_errors: int = 0
    handler_errors: int = 0


Handler = Callable[[Message], None]


def backoff_delay(
    attempt: int, min_delay: float, max_delay: float, rand: Callable[[], float]
) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(max, min * 2**attempt)]``."""
    cap = min(max_delay, min_delay * 2.0 ** min(attempt, 32))
    return rand() * cap
