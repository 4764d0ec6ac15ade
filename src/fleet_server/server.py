"""``fleet-server serve``: wire the registry, MQTT gateway, service and admin API, run, stop.

Start-up order (each step refuses to start on a typed error, before anything is served):
admin token, builder root (the provisioned one and the versions rotated to since,
``fleet_server.pki.roots``), online signer (its key must be one of the root's ``timestamp`` keys,
or every document it signs would be refused by devices), registry open + upgrade, MQTT client
connect, gateway start (with remote diagnostics, whose state is ``<state_dir>/diagnostics``),
admin API start. Shutdown on SIGTERM/SIGINT runs in reverse: admin API
stopped (in-flight requests finish), gateway closed (queued telemetry stored), MQTT closed,
registry closed.

Owns: files and process lifecycle. Decisions live in ``service``, HTTP in ``admin``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner

from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.errors import EdgefleetError, TransportTimeoutError
from edge_agent.trust import TrustedRoot
from edge_agent.trust.desired import SIGNING_ROLE
from edge_agent.wire.topics import Topics
from fleet_server.accounts.store import Accounts
from fleet_server.admin.accounts import account_routes
from fleet_server.admin.accuracy import accuracy_routes
from fleet_server.admin.api import AdminServer, RouteProvider, create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.auth import Authenticator
from fleet_server.admin.drift import drift_routes
from fleet_server.admin.evalsets import evalset_routes
from fleet_server.admin.ops.agents import agent_routes
from fleet_server.admin.ops.capture import capture_routes
from fleet_server.admin.ops.diagnostics import diagnostics_routes
from fleet_server.admin.ops.labels import label_routes
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.admin.root import root_routes
from fleet_server.capture.service import CaptureService
from fleet_server.capture.store import DatasetStore
from fleet_server.config import ApiConfig, ServerConfig
from fleet_server.console.routes import ConsoleDeps, console_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.drift.service import DriftService
from fleet_server.errors import ServerConfigError
from fleet_server.evalsets.offline import OfflineComparer
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.fallback.cloud_models import RegistryCloudModels
from fleet_server.fallback.worker import FallbackWorker
from fleet_server.gateway.gateway import Gateway
from fleet_server.jobs.history import HistoryJob, HistoryPolicy
from fleet_server.jobs.leader import leader_lock
from fleet_server.jobs.periodic import PeriodicJob
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.pki.roots import ServerRoots
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

__all__ = ["capture_collector", "load_online_signer", "read_admin_token", "run"]

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 30.0


def read_admin_token(api: ApiConfig) -> str:
    """The admin bearer token from ``api.token`` or the first line of ``api.token_file``.

    Raises:
        ServerConfigError: neither is set, the file is unreadable, or the token is short.
    """
    token = api.token
    if token is None and api.token_file is not None:
        try:
            token = Path(api.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServerConfigError(f"api.token_file cannot be read: {exc}") from exc
    if token is None:
        raise ServerConfigError("api.token_file (or api.token) is required: no admin token")
    if len(token) < 16:
        raise ServerConfigError("api token must be at least 16 characters")
    return token


def load_online_signer(path: Path, root: TrustedRoot, passphrase: bytes | None) -> CryptoSigner:
    """The online (``timestamp``) signer from a PKCS#8 PEM file, checked against the root.

    Raises:
        ServerConfigError: unreadable key, wrong passphrase, or not a ``timestamp`` key of root.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), passphrase)
        signer = CryptoSigner(key)
    except (OSError, ValueError, TypeError) as exc:
        raise ServerConfigError(f"signing.online_key {path} cannot be loaded: {exc}") from exc
    if signer.public_key.keyid not in root.keyids(SIGNING_ROLE):
        raise ServerConfigError(
            f"signing.online_key {path} is not a {SIGNING_ROLE} key of the root in "
            "signing.root_path: devices would refuse every desired state it signs"
        )
    return signer


@dataclass(frozen=True)
class AdminParts:
    """What the admin API's route providers serve (see ``admin_routes``)."""

    service: FleetService
    registry: Registry
    drift: DriftService
    runner: RolloutRunner
    evalsets: EvalSetStore
    accounts: Accounts
    diagnostics: Diagnostics
    capture: CaptureService
    max_upload_bytes: int
    clock: Callable[[], datetime]


def admin_routes(parts: AdminParts) -> tuple[RouteProvider, ...]:
    """Every guarded route provider the admin API mounts, in one list: ``run`` serves it and the
    role x route test (``tests/unit/test_admin_roles.py``) builds the same app from it, so a
    route cannot be served without a row in the permission table. (The console's routes check
    roles themselves and are mounted beside these.)"""
    p = parts
    return (
        lambda guard: drift_routes(p.drift, guard),
        lambda guard: accuracy_routes(p.registry, p.clock, guard),
        lambda guard: rollout_routes(p.runner, guard),
        lambda guard: evalset_routes(p.evalsets, guard),
        lambda guard: label_routes(p.registry, guard),
        lambda guard: root_routes(p.service, guard),
        lambda guard: agent_routes(p.service, p.max_upload_bytes, guard),
        lambda guard: account_routes(p.accounts, guard),
        lambda guard: diagnostics_routes(p.diagnostics, guard),
        lambda guard: capture_routes(p.capture, p.evalsets, guard),
    )


def run(
    config: ServerConfig,
    *,
    passphrase: bytes | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the server until SIGTERM/SIGINT (or ``stop`` is set); returns the exit code.

    Raises:
        ServerConfigError: no admin token, bad root, online key or gateway settings.
        RegistryError: the database cannot be opened or migrated.
        TransportError: the broker cannot be reached within 30 s, or refuses subscriptions.
        OSError: the admin API cannot listen.
    """
    # The bootstrap token (the built-in admin) is optional once named accounts exist.
    token = read_admin_token(config.api) if config.api.bootstrap_token else None
    roots = ServerRoots.open(
        Path(config.signing.root_path),
        Path(config.registry.state_dir) / "roots",
        clock=lambda: datetime.now(UTC),
    )
    root = roots.current
    signer = load_online_signer(Path(config.signing.online_key), root, passphrase)
    stop = stop or threading.Event()
    _install_signals(stop)

    Path(config.registry.state_dir).mkdir(parents=True, exist_ok=True)
    registry = Registry.open(config.registry.url)
    g = config.gateway  # the [gateway] section is the gateway's own config
    m = config.mqtt
    client = MqttClient(
        MqttConfig(
            host=m.host,
            port=m.port,
            device_id=m.client_id,
            ca_path=Path(m.ca_path),
            cert_path=Path(m.cert_path),
            key_path=Path(m.key_path),
            prefix=g.prefix,
            session_expiry=m.session_expiry,
            announce_status=False,
            clean_start=False,
            inbox_size=100_000,
        )
    )
    gateway: Gateway | None = None
    admin: AdminServer | None = None
    fallback: FallbackWorker | None = None
    runner: RolloutRunner | None = None
    history: HistoryJob | None = None
    collector: PeriodicJob | None = None
    diagnostics: Diagnostics | None = None
    try:
        registry.upgrade()
        gateway = Gateway(registry, client, g)
        diagnostics = Diagnostics(
            registry,
            client,
            Topics(g.prefix),
            [signer],
            Path(config.registry.state_dir) / "diagnostics",
            clock=lambda: datetime.now(UTC),
        )
        gateway.attach_diagnostics(diagnostics)
        capture = CaptureService(
            registry,
            diagnostics,
            DatasetStore(Path(config.registry.state_dir) / "datasets", registry),
            clock=lambda: datetime.now(UTC),
        )
        client.connect()
        try:
            client.wait_connected(CONNECT_TIMEOUT)
        except TransportTimeoutError as exc:
            raise TransportTimeoutError(
                f"broker {m.host}:{m.port} not reachable in {CONNECT_TIMEOUT:.0f}s: {exc}"
            ) from exc
        gateway.start()
        diagnostics.start()
        library = BundleLibrary(Path(g.bundles_dir), root, max_bytes=config.api.max_upload_bytes)
        service = FleetService(
            registry,
            library,
            gateway,
            [signer],
            clock=lambda: datetime.now(UTC),
            ttl=timedelta(seconds=config.signing.desired_ttl_seconds),
            roots=roots,
        )
        if config.fallback.enabled:
            fallback = _start_fallback(config, client, roots, library, registry)
        drift = DriftService(registry, library.directory)
        evalsets = EvalSetStore(Path(config.registry.state_dir) / "evalsets", registry)
        offline = OfflineComparer(
            evalsets, library.directory, lambda: roots.current, clock=lambda: datetime.now(UTC)
        )
        # Every worker takes rollout commands; only the holder of the leader lock steps them.
        runner = RolloutRunner(
            registry,
            service,
            clock=lambda: datetime.now(UTC),
            interval=config.rollouts.interval_seconds,
            lock=leader_lock(registry.engine, "rollout-engine"),
            offline=offline,
        )
        runner.start()
        history = _start_history(config, registry)
        collector = capture_collector(config, registry, capture)
        if collector is not None:
            collector.start()
        accounts = Accounts(registry, lambda: datetime.now(UTC))
        authenticator = Authenticator(accounts, token)
        # The audit guard reads JSON bodies up to the largest route cap (root chains: 1 MiB);
        # each route still applies its own cap to the body it is handed.
        auditor = Auditor(
            registry,
            lambda: datetime.now(UTC),
            max_body_bytes=max(config.api.max_request_bytes, 1024 * 1024),
        )
        # The web console: the same service objects, authenticator and auditor as the API.
        console = ConsoleDeps(
            service,
            runner,
            drift,
            authenticator,
            auditor,
            fallback.stats if fallback is not None else None,
            diagnostics,
        )
        app = create_app(
            service,
            token,
            authenticator=authenticator,
            max_request_bytes=config.api.max_request_bytes,
            max_upload_bytes=config.api.max_upload_bytes,
            extra_routes=(
                *admin_routes(
                    AdminParts(
                        service,
                        registry,
                        drift,
                        runner,
                        evalsets,
                        accounts,
                        diagnostics,
                        capture,
                        config.api.max_upload_bytes,
                        lambda: datetime.now(UTC),
                    )
                ),
                lambda guard: console_routes(console),
            ),
            extra_metrics=(
                ("diagnostics", diagnostics.stats),
                ("capture", capture.stats),
                *((("fallback", fallback.stats),) if fallback is not None else ()),
            ),
            auditor=auditor,
        )
        admin = AdminServer(app, config.api.host, config.api.port)
        admin.start()
        log.info(
            "fleet server ready: admin API http://%s:%d, broker %s:%d, registry %s",
            config.api.host,
            admin.port,
            m.host,
            m.port,
            registry.engine.url.render_as_string(hide_password=True),
        )
        stop.wait()
        log.info("fleet server stopping")
    finally:
        if history is not None:
            history.close()
        if collector is not None:
            collector.close()
        _shutdown(admin, runner, fallback, gateway, client, registry)
        if diagnostics is not None:  # after the admin API and the gateway stopped using it
            diagnostics.close()
    return 0


def _start_history(config: ServerConfig, registry: Registry) -> HistoryJob:
    """Fold telemetry into rollups and apply retention on the leader (any worker is safe)."""
    r = config.retention
    job = HistoryJob(
        registry,
        HistoryPolicy(
            raw_retention_seconds=r.raw_days * 86400,
            fine_retention_seconds=r.fine_days * 86400,
            hour_retention_seconds=r.hour_days * 86400,
            delete_batch=r.delete_batch,
        ),
        clock=lambda: datetime.now(UTC),
        interval=r.interval_seconds,
        lock=leader_lock(registry.engine, "telemetry-history"),
    )
    job.start()
    return job


def capture_collector(
    config: ServerConfig, registry: Registry, capture: CaptureService
) -> PeriodicJob | None:
    """The job (not started) that collects capture chunks of every enabled model on the
    leader, every ``[capture] collect_interval_seconds`` (None: off). The leader issues the
    commands, so its diagnostics receive the answers and pull the uploads. A command lives one
    interval: a device offline for longer gets the next one instead of a queue of them."""
    seconds = config.capture.collect_interval_seconds
    if seconds <= 0:
        return None
    ttl = timedelta(seconds=seconds)
    return PeriodicJob(
        "capture-collect",
        lambda: capture.collect_enabled(ttl),
        interval=seconds,
        lock=leader_lock(registry.engine, "capture-collect"),
        what="capture collection",
        logger=log,
    )


def _start_fallback(
    config: ServerConfig,
    client: MqttClient,
    roots: ServerRoots,
    library: BundleLibrary,
    registry: Registry,
) -> FallbackWorker:
    """Start answering fallback requests (shared subscription) with the version each device
    runs: its published bundle, or the model ``models_dir`` registers for it.

    Raises:
        FallbackServingError: a model in ``models_dir`` cannot be loaded.
    """
    f = config.fallback
    source = RegistryCloudModels(
        registry,
        library.directory,
        lambda: roots.current,
        clock=lambda: datetime.now(UTC),
        models_dir=Path(f.models_dir) if f.models_dir else None,
    )
    worker = FallbackWorker(
        client,
        {},
        Topics(config.gateway.prefix),
        f.share_group,
        threads=f.threads,
        max_queue=f.max_queue,
        source=source,
    )
    worker.start()
    log.info("cloud fallback serving %s", source.describe())
    return worker


def _shutdown(
    admin: AdminServer | None,
    runner: RolloutRunner | None,
    fallback: FallbackWorker | None,
    gateway: Gateway | None,
    client: MqttClient,
    registry: Registry,
) -> None:
    if admin is not None:
        admin.stop()
    if runner is not None:
        runner.close()
    if fallback is not None:
        fallback.close()
    if gateway is not None:
        try:
            gateway.close()
        except EdgefleetError as exc:  # close is documented never to raise; belt and braces
            log.warning("gateway close failed: %s", exc)
    client.close()
    registry.close()


def _install_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # embedded (tests): the caller sets ``stop``

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
