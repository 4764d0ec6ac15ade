"""An in-memory MQTT v5 broker and client behind ``Transport``: the test double of the seam.

Owns: ``MemoryBroker`` (sessions, subscriptions, retained messages, queues) and
``MemoryClient`` (one session; implements ``edge_agent.common.transport.Transport`` like the
paho adapter ``edge_agent.common.mqtt.MqttClient``). Shipped in the package, like httpx's
``MockTransport``, so sync, delivery and ingest logic get fast tests without sockets.

Modules (each imports only those after it): ``_broker`` (``MemoryBroker``: the core plus its
client factory) · ``_client`` (``MemoryClient``) · ``_core`` (``BrokerCore``: sessions, topic
tree, retained store, routing, delivery) · ``_peer`` (``Peer``, the broker's view of a client,
so the core never imports the client; ``MemoryPublishHandle``).

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

``MemoryBroker.published()`` counts every publish (wills included) by ``(topic, qos, retain)``
as the publisher sent it, so a test can check publishers against ``TOPIC_SPECS``.

Does not enforce ACLs, message size limits or inflight windows, and has no network: what only
a real broker shows stays in the real-Mosquitto integration tests.
"""

from edge_agent.common.memory._broker import MemoryBroker
from edge_agent.common.memory._client import MemoryClient
from edge_agent.common.memory._peer import MemoryPublishHandle

__all__ = ["MemoryBroker", "MemoryClient", "MemoryPublishHandle"]
