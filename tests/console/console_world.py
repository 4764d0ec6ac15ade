"""A console over real parts for its tests: a SQLite registry, the fleet service (over the
``FakeGateway``), the rollout runner (over a recording ``AssignPort``), fleet drift, accounts
with cheap argon2 parameters, the admin guard's ``Authenticator`` and ``Auditor``.

``ConsoleWorld.app()`` is the admin app with the console mounted as ``fleet-server serve``
mounts it; ``login`` gives a ``TestClient`` with a live session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.testclient import TestClient

from clock import FakeClock
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from edge_agent.wire.topics import Topics
from fakes import FakeGateway
from fleet_server.accounts.passwords import Passwords
from fleet_server.accounts.roles import Role
from fleet_server.accounts.store import Accounts
from fleet_server.admin.api import create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.console.routes import ConsoleDeps, console_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.drift.service import DriftService
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery staple"
TOKEN = "b" * 32
ROLES = {"ada": Role.ADMIN, "rel": Role.RELEASE_MANAGER, "ops": Role.OPERATOR, "viv": Role.VIEWER}
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Assigner:
    """The runner's ``AssignPort``: records assignments (no MQTT)."""

    assigned: list[tuple[str, str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.assigned.append((target, name, version))
        return []


@dataclass
class Published:
    """The diagnostics' MQTT publish half: records what it would send (no broker)."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Any = None) -> Published:  # fmt: skip
        self.sent.append((topic, payload))
        return self

    def is_published(self) -> bool:
        return True


@dataclass
class ConsoleWorld:
    registry: Registry
    service: FleetService
    gateway: FakeGateway
    runner: RolloutRunner
    assigner: Assigner
    accounts: Accounts
    auth: Authenticator
    auditor: Auditor
    drift: DriftService
    clock: FakeClock
    diagnostics: Diagnostics
    published: Published
    seqs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(
        cls, tmp: Path, *, clock: FakeClock | None = None, keys: KeyStore | None = None
    ) -> ConsoleWorld:
        """A world in ``tmp``; ``keys``: the key store bundles are signed with (default: a
        new one)."""
        clock = clock or FakeClock(wall=T0)
        registry = Registry.open(f"sqlite:///{tmp / 'registry.db'}", clock=clock.wall)
        registry.upgrade()
        keys = keys or KeyStore.init(tmp / "keys", now=clock.wall())
        gateway = FakeGateway()
        service = FleetService(
            registry,
            BundleLibrary(tmp / "bundles", keys.trusted_root()),
            gateway,
            [keys.signer("online-1")],
            clock=clock.wall,
            ttl=timedelta(hours=1),
        )
        assigner = Assigner()
        runner = RolloutRunner(registry, assigner, clock.wall, interval=3600)
        cheap = Passwords(PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
        accounts = Accounts(registry, clock.wall, passwords=cheap)
        for name, role in ROLES.items():
            accounts.create(name, role, PASSWORD)
        auth = Authenticator(accounts, TOKEN)
        auditor = Auditor(registry, clock.wall, max_body_bytes=1024 * 1024)
        drift = DriftService(registry, tmp / "bundles", clock=clock.wall)
        published = Published()
        diagnostics = Diagnostics(registry, published, Topics(), [keys.signer("online-1")],  # type: ignore[arg-type]
                                  tmp / "diagnostics", clock=clock.wall)  # fmt: skip
        return cls(registry, service, gateway, runner, assigner, accounts, auth, auditor, drift,
                   clock, diagnostics, published)  # fmt: skip

    def close(self) -> None:
        self.diagnostics.close()
        self.runner.close()
        self.registry.close()

    def app(self) -> Starlette:
        deps = ConsoleDeps(self.service, self.runner, self.drift, self.auth, self.auditor,
                           diagnostics=self.diagnostics)  # fmt: skip
        return create_app(
            self.service,
            TOKEN,
            authenticator=self.auth,
            auditor=self.auditor,
            extra_routes=(
                lambda guard: rollout_routes(self.runner, guard),
                lambda guard: console_routes(deps),
            ),
        )

    # ------------------------------------------------------------------ fleet state
    def install(self, device: str, active: int, assigned: int, outcome: str = "installed") -> None:
        m = ModelReport(active=active, assigned=assigned, outcome=outcome)
        self.registry.record_reported(
            device, ReportedState(device, 0.0, "0.1", 1, {"digits": m}).to_dict()
        )

    def report(self, device: str, version: int, ok: int, *, at: float = 1.0) -> None:
        seq = self.seqs[device] = self.seqs.get(device, 0) + 1
        buckets = (0, 0, 0, ok, 0, 0, 0, 0, 0, 0, 0, 0)
        stats = ModelStats(version=version, outcomes={"ok": ok, "error": 0, "rejected": 0},
                           sources={"device": ok, "cloud": 0}, latency_buckets=buckets)  # fmt: skip
        r = TelemetryReport(device, seq, at - 1.0, at, started_at=1.0, models={"digits": stats})
        self.registry.ingest(device, [r])


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Log ``client`` in as ``name``; the session's CSRF token (read from a page's form)."""
    r = client.post(
        "/console/login",
        data={"name": name, "password": password, "next": "/console/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = client.get("/console/rollouts")
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None
    return found.group(1)
