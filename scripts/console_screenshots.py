"""Screenshots of the operator console's main pages into docs/console/ (PNG).

Builds a small fleet in a temporary directory (a real SQLite registry, 40 devices in three
groups, the last hour of telemetry and a few events of eight of them, drift windows of
eighteen, two versions of the digits example model built and signed by model-builder, a
rollout that a gate halts, the audit entries of the console's writes), serves
the admin app with the console on 127.0.0.1 (uvicorn), logs in with Debian's chromium
(Playwright) and saves one PNG per page. The presence of devices comes from a stand-in for
the MQTT gateway (there is no broker here); everything else is the server's own code.

Usage: .venv/bin/python scripts/console_screenshots.py [--out docs/console]
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from argon2 import PasswordHasher
from playwright.sync_api import sync_playwright

from edge_agent.bundle import read_bundle
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.drift import DriftMonitor, MonitorPolicy
from edge_agent.wire.ops.diagnostics import CommandAnswer
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import (
    DriftSummary,
    Event,
    ModelStats,
    StatusMessage,
    TelemetryReport,
)
from edge_agent.wire.topics import Topics
from fleet_server.accounts.passwords import Passwords
from fleet_server.accounts.roles import Role
from fleet_server.accounts.store import Accounts
from fleet_server.admin.api import AdminServer, create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.console.routes import ConsoleDeps, console_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.drift.service import DriftService
from fleet_server.gateway.misbehaviour import DeviceMisbehaviour
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.build import build_bundle
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.examples import ExampleModel, digits_mlp
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle

PASSWORD = secrets.token_urlsafe(16)  # this run's throwaway account
CHROMIUM = "/usr/bin/chromium"
DRIFT_FEATURE = 20
PAGES = (
    ("login", "/console/login"),
    ("overview", "/console/"),
    ("devices", "/console/devices?group=line-3"),
    ("device", "/console/devices/cam-007"),
    ("models", "/console/models"),
    ("rollouts", "/console/rollouts"),
    ("rollout", "ROLLOUT"),
    ("drift", f"/console/drift?model=digits&version=1&by=group&since=24h&feature={DRIFT_FEATURE}"),
    ("fallback", "/console/fallback"),
    ("audit", "/console/audit"),
    ("accounts", "/console/accounts"),
    ("me", "/console/me"),
)


@dataclass
class Published:
    """The diagnostics' MQTT publish half (no broker here): keeps what it would send."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> Published:
        self.sent.append((topic, payload))
        return self

    def is_published(self) -> bool:
        return True


def _diagnostics(diagnostics: Diagnostics, device: str) -> None:
    """A ping the device answered and a log fetch still pending, as the device page shows."""
    ping = diagnostics.issue("ping", {}, device_id=device).commands[0]
    answer = CommandAnswer(
        device, ping.id, "ping", True, {"agent_version": "0.4.1", "uptime_s": 5321}
    )
    diagnostics.on_answer(device, Message(
        Topics().device("command_resp", device), answer.to_bytes(), 1, False,
        MessageProperties(correlation_data=ping.id.encode()),
    ))  # fmt: skip
    diagnostics.issue("logs", {}, device_id=device)


@dataclass
class Presence:
    """Stands in for the MQTT gateway: who is online (``GatewayPort``)."""

    status: dict[str, StatusMessage] = field(default_factory=dict)

    def publish_desired(self, device_id: str, document: bytes) -> None:
        """Nothing is published (no broker)."""

    def start_wave(self, sha256: str) -> str:
        return "wave-1"

    def stats(self) -> object:
        return None

    def online(self) -> Mapping[str, StatusMessage]:
        return dict(self.status)

    def misbehaviour(
        self, device_id: str | None = None, *, top: int = 20
    ) -> Sequence[DeviceMisbehaviour]:
        return []


@dataclass
class Assigner:
    """The rollout runner's ``AssignPort``: records assignments (no broker)."""

    assigned: list[tuple[str, str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.assigned.append((target, name, version))
        return []


def _bundles(keys: KeyStore, work: Path) -> tuple[list[Path], ExampleModel]:
    """Two signed versions of the digits example model, built as ``model-builder`` builds
    them (static int8 quantization, accuracy gate, drift baseline, provenance, report)."""
    now = datetime.now(UTC)
    ex = digits_mlp()
    result = build_bundle(
        ex.model_bytes,
        "onnx",
        Dataset({ex.input_name: ex.x_calib}, None),
        Dataset({ex.input_name: ex.x_eval}, ex.y_eval),
        (ex.input_contract(max_batch=64), ex.output_contract()),
        BuildConfig(name="digits", version=1, measure_latency=False, arch=("any",)),
        keys,
        now=now,
    )
    v1 = work / "digits-1.efb"
    v1.write_bytes(result.bundle)
    artifact = read_bundle(v1, keys.trusted_root(), now=now, installed_version=None,
                           device=None).artifact  # fmt: skip
    v2 = work / "digits-2.efb"
    v2.write_bytes(
        package_bundle(dataclasses.replace(result.manifest, version=2), artifact, keys, now=now)
    )
    return [v1, v2], ex


def _fleet(registry: Registry, presence: Presence) -> list[str]:
    ids = []
    for i in range(40):
        device = f"cam-{i:03d}"
        group = ("line-3", "line-4", "lab")[i % 3]
        registry.enroll(device, group=group, tags={"site": "plant-a" if i < 30 else "plant-b"})
        registry.record_reported(
            device,
            ReportedState(device, 0.0, "0.4.1", 3, {"digits": ModelReport(1, (1,), 1)}).to_dict(),
        )
        if i % 7:
            presence.status[device] = StatusMessage(device, "online", 0.0, "connected")
        ids.append(device)
    return ids


def _drift(registry: Registry, service: DriftService, ex: ExampleModel, ids: list[str]) -> None:
    """Drift windows of real digits inputs from 18 devices; on line-4 one pixel reads bright
    (a smudged lens, say), so that feature drifts in that cohort only."""
    baseline = service.baseline("digits", 1)
    rng = np.random.default_rng(7)
    now = time.time()
    for device in ids[10:28]:
        rows = ex.x_eval[rng.integers(0, len(ex.x_eval), size=600)].astype(np.float64)
        if int(device.removeprefix("cam-")) % 3 == 1:  # line-4 (see _fleet)
            rows[:, DRIFT_FEATURE] += 6.0
        monitor = DriftMonitor(baseline, MonitorPolicy(max_values=300, min_values=1))
        windows = monitor.observe(ex.input_name, rows, now=now)
        stats = ModelStats(version=1, drift=tuple(map(DriftSummary.from_window, windows)))
        registry.ingest(
            device, [TelemetryReport(device, 1, now - 300, now, models={"digits": stats})]
        )


def _telemetry(registry: Registry, device: str, now: float) -> None:
    started, total, cloud, rejected = now - 7200, 0, 0, 0
    reports: list[TelemetryReport | Event] = []
    for k in range(30):
        total += 110 + (k * 37) % 60
        cloud += 4 + (k % 5 == 0) * 12
        rejected += k % 4
        stats = ModelStats(
            version=1,
            outcomes={"ok": total - rejected, "error": 0, "rejected": rejected},
            sources={"device": total - cloud, "cloud": cloud},
            latency_ms={"p50": 3.1 + (k % 3) * 0.2, "p99": 8.5 + (k % 6) * 1.3},
        )
        end = now - (30 - k) * 120
        reports.append(
            TelemetryReport(device, k + 1, end - 120, end, started_at=started,
                            models={"digits": stats})
        )  # fmt: skip
    reports.append(Event(device, 31, "fallback_breaker_open", now - 600, model="digits",
                         detail="cloud fallback: 5 timeouts in a row"))  # fmt: skip
    reports.append(Event(device, 32, "fallback_breaker_closed", now - 300, model="digits"))
    reports.append(Event(device, 33, "drift_alert", now - 200, model="digits", version=1,
                         detail="input 0: feature 12 PSI 0.31 over 0.12 (n=2400)"))  # fmt: skip
    registry.ingest(device, reports)


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clock = lambda: datetime.now(UTC)  # noqa: E731
        registry = Registry.open(f"sqlite:///{work / 'registry.db'}")
        registry.upgrade()
        keys = KeyStore.init(work / "keys", now=clock())
        presence = Presence()
        service = FleetService(
            registry, BundleLibrary(work / "bundles", keys.trusted_root()), presence,
            [keys.signer("online-1")], clock=clock, ttl=timedelta(hours=1),
        )  # fmt: skip
        paths, example = _bundles(keys, work)
        for path in paths:
            service.publish_model(path)
        ids = _fleet(registry, presence)
        for device in ids[:8]:
            _telemetry(registry, device, time.time())
        drift = DriftService(registry, work / "bundles")
        _drift(registry, drift, example, ids)
        assigner = Assigner()
        runner = RolloutRunner(registry, assigner, clock, interval=3600)
        accounts = Accounts(registry, clock, passwords=Passwords(PasswordHasher()))
        accounts.create("maria", Role.ADMIN, PASSWORD)
        for name, role in (
            ("sam", Role.OPERATOR),
            ("lee", Role.VIEWER),
            ("ci", Role.RELEASE_MANAGER),
        ):
            accounts.create(name, role, None if name == "ci" else secrets.token_urlsafe(16))
        accounts.create_token("maria", Role.VIEWER, clock() + timedelta(days=90), "grafana")
        label_store.set_labels(registry, "cam-007", {"site": "north", "camera": "dock-2"})
        diagnostics = Diagnostics(registry, Published(), Topics(), [keys.signer("online-1")],  # type: ignore[arg-type]
                                  work / "diagnostics", clock=clock)  # fmt: skip
        _diagnostics(diagnostics, "cam-007")
        auth = Authenticator(accounts, None)
        auditor = Auditor(registry, clock, max_body_bytes=1024 * 1024)
        deps = ConsoleDeps(service, runner, drift, auth, auditor, diagnostics=diagnostics)
        app = create_app(
            service, None, authenticator=auth, auditor=auditor,
            extra_routes=(lambda g: rollout_routes(runner, g), lambda g: console_routes(deps)),
        )  # fmt: skip
        server = AdminServer(app, "127.0.0.1", 0)
        server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
                )
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"{base}/console/login")
                page.screenshot(path=str(out / "login.png"))
                page.fill("input[name=name]", "maria")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("h1:has-text('Fleet overview')")
                # A rollout through the console's form, halted by a gate on the next steps.
                page.goto(f"{base}/console/rollouts")
                form = page.locator("#create-rollout")
                form.locator("input[name=model]").fill("digits")
                form.locator("input[name=version]").fill("2")
                form.locator("input[name=selector]").fill("line-3")
                form.locator("input[name=canary_count]").fill("2")
                form.locator("input[name=min_devices]").fill("2")
                form.locator("select[name=on_breach]").select_option("pause")
                form.locator("button[type=submit]").click()
                page.wait_for_selector("#rollout-state")
                rollout = runner.rollouts()[0]
                [decision] = runner.step()
                canaries = sorted(decision.assign)
                for n, device in enumerate(canaries):
                    outcome = "rolled_back" if n == 0 else "installed"
                    report = ModelReport(1 if n == 0 else 2, (1,), 2, outcome)
                    registry.record_reported(
                        device,
                        ReportedState(device, 0.0, "0.4.1", 4, {"digits": report}).to_dict(),
                    )
                runner.step()
                for name, path in PAGES[1:]:
                    url = f"/console/rollouts/{rollout.id}" if path == "ROLLOUT" else path
                    page.goto(base + url)
                    page.wait_for_selector("h1")
                    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                    print(f"{out / name}.png")
                tablet = browser.new_page(viewport={"width": 820, "height": 1180})
                tablet.context.add_cookies(page.context.cookies())
                tablet.goto(f"{base}/console/rollouts/{rollout.id}")
                tablet.wait_for_selector("h1")
                tablet.screenshot(path=str(out / "rollout-tablet.png"))
                print(f"{out / 'rollout-tablet'}.png")
                browser.close()
        finally:
            server.stop()
            diagnostics.close()
            runner.close()
            registry.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/console"))
    raise SystemExit(main(parser.parse_args().out))
