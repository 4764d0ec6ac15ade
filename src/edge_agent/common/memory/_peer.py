"""What passes between the in-memory broker and its clients: the ``Peer`` protocol, the handle.

Owns ``Peer``, the broker's view of a client session (the broker core calls only these names,
so it never imports the client: the client imports the broker core instead), and
``MemoryPublishHandle``, what the broker returns for a publish.

Does not route, store or deliver anything (``_core`` does) and is not a transport (``_client``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edge_agent.common.mqtt_types import Message

__all__ = ["MemoryPublishHandle", "Peer"]


@dataclass(frozen=True)
class MemoryPublishHandle:
    """A publish the in-memory broker has taken: acknowledged at once."""

    mid: int

    def is_published(self) -> bool:
        """Always True: the broker took the message when ``publish`` returned."""
        return True


class Peer(Protocol):
    """A client as the broker core sees it (``MemoryClient`` implements it).

    The broker calls the methods under its own lock, except ``after_connect`` and ``deliver``.
    """

    client_id: str
    clean_start: bool
    session_expiry: int
    #: What the broker publishes (topic, payload, QoS, retain) when the connection drops.
    will: Message | None

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the current session."""
        ...

    @property
    def wants_connection(self) -> bool:
        """Whether the client reconnects when the broker starts again."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the client's ``MqttStats`` counters."""
        ...

    def session_accepted(self) -> None:
        """The broker accepted the session (the client is connected from now on)."""
        ...

    def after_connect(self) -> None:
        """Called once the session is accepted: the client makes its subscriptions."""
        ...

    def session_ended(self, pending: bool) -> None:
        """The connection is gone; ``pending``: reconnect when the broker is back."""
        ...

    def deliver(self, message: Message) -> None:
        """One message for this client (its handlers run on the calling thread)."""
        ...
