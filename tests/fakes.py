"""Fakes of production interfaces shared by the tests (one of each).

``FakeGateway`` implements ``fleet_server.service.GatewayPort``: what ``FleetService`` needs of
the MQTT gateway. It records what it is asked and answers from fields the test sets. It does not
speak MQTT, keep presence, or count refusals itself (give it a ``MisbehaviourBook`` for that);
the real gateway is tested against a real broker in ``tests/integration/test_gateway.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_agent.errors import NotConnectedError
from edge_agent.wire.telemetry import StatusMessage
from fleet_server.gateway.misbehaviour import DeviceMisbehaviour, MisbehaviourBook


@dataclass(frozen=True)
class FakeGatewayStats:
    """The counters ``FakeGateway.stats`` reports (a dataclass, as the real ``GatewayStats``)."""

    desired_published: int
    messages: dict[str, int]


@dataclass
class FakeGateway:
    """Implements ``GatewayPort``; records what the service asked of it.

    Attributes:
        published: every ``(device_id, document)`` handed to ``publish_desired``, in order.
        waves: the sha256 of every wave started, in order; wave ids are ``wave-<n>``.
        status: what ``online`` answers (device id -> last status message).
        messages: messages by kind, reported by ``stats`` (``messages_<kind>`` in the status).
        fail: when set, ``publish_desired`` raises ``NotConnectedError`` (the broker is down).
        book: refusal counters ``misbehaviour`` answers from; ``None``: nobody misbehaved.
    """

    published: list[tuple[str, bytes]] = field(default_factory=list)
    waves: list[str] = field(default_factory=list)
    status: dict[str, StatusMessage] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    fail: bool = False
    book: MisbehaviourBook | None = None

    def publish_desired(self, device_id: str, document: bytes) -> None:
        if self.fail:
            raise NotConnectedError("broker down")
        self.published.append((device_id, document))

    def start_wave(self, sha256: str) -> str:
        self.waves.append(sha256)
        return f"wave-{len(self.waves)}"

    def stats(self) -> FakeGatewayStats:
        return FakeGatewayStats(len(self.published), dict(self.messages))

    def online(self) -> dict[str, StatusMessage]:
        return dict(self.status)

    def misbehaviour(
        self, device_id: str | None = None, *, top: int = 20
    ) -> Sequence[DeviceMisbehaviour]:
        if self.book is None:
            return []
        return [self.book.of(device_id)] if device_id else self.book.top(top)
