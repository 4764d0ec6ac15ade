"""``MemoryBroker``: the in-memory broker core with its client factory.

Owns making clients (``client``); everything else is ``BrokerCore``'s. Defined above both the
core and the client so that neither imports the other's module in a cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_agent.common.memory._client import MemoryClient
from edge_agent.common.memory._core import BrokerCore
from edge_agent.wire.topics import Topics

__all__ = ["MemoryBroker"]


class MemoryBroker(BrokerCore):
    """The broker: make clients with ``client``, deliver with ``pump``; see the package doc.

    Args:
        clock: seconds (session and message expiry); a fake clock in tests.
        persistence: whether sessions and retained messages survive ``stop``/``start``.
        blocking: whether ``request`` and ``pump_until`` wait (on a condition, up to their
            timeout) for messages from other threads once nothing is queued.
        retained_to_shared: whether a new shared subscription gets the retained messages it
            matches, as Mosquitto 2.0 does (MQTT 5 says it gets none).
    """

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
        self.attach(c)
        return c
