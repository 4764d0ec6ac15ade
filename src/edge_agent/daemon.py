"""``edge-agent run``: wire config, store, agent and front ends; run until SIGTERM.

Owns process concerns only: logging (plain or JSON), the signals (SIGTERM/SIGINT stop the
daemon, SIGHUP reloads), the control thread (probation, drift windows, picking up installs made
by the CLI, the systemd watchdog), ``sd_notify`` readiness, and an orderly shutdown: every front
end (``edge_agent.api.server.Listener``: the HTTP API on TCP and the Unix socket, gRPC when
enabled) stops accepting at the same moment and drains in-flight requests for
``api.drain_seconds``, then sync stops and models are unloaded. No front end owns the process:
each runs on its own threads, and the daemon's main thread waits for the stop signal.

A signed remote ``restart`` command (``edge_agent.sync.ops.commands``) stops the daemon exactly as
SIGTERM does, and ``run`` then returns ``EXIT_RESTART`` (75): the service manager starts the
agent again (the systemd unit restarts it on any exit). The recent log records a remote ``logs``
command or a support bundle reads are kept in memory by ``edge_agent.common.logring.LogRing``,
installed beside the console handler.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.common.logring import LogRing
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError, EdgefleetError
from edge_agent.runtime.device import detect_device_profile
from edge_agent.selfupdate.trial import TrialWatch
from edge_agent.serving.agent import Agent
from edge_agent.serving.capture import CaptureRing
from edge_agent.serving.fallback import FallbackTransport
from edge_agent.store import ModelStore
from edge_agent.trust import TrustedRoot
from edge_agent.wire.topics import Topics

if TYPE_CHECKING:
    from edge_agent.api.server import Listeners
    from edge_agent.sync.loop import SyncAgent

log = logging.getLogger("edge_agent.daemon")
TICK_SECONDS = 1.0
RELOAD_EVERY_TICKS = 2
#: The control loop may be held this long (an install) before the watchdog stops being fed.
WATCHDOG_GRACE = 300.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: AgentConfig) -> LogRing:
    """Log to stderr (plain or JSON) and into a bounded in-memory ring; returns the ring.

    Both see the records at or above ``log_level`` (the ring holds what the console shows).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if config.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    ring = LogRing()
    root = logging.getLogger()
    root.handlers[:] = [handler, ring]
    root.setLevel(config.log_level.upper())
    return ring


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket when running under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), addr)
    except OSError:
        return False
    return True


def build_agent(config: AgentConfig, transport: FallbackTransport | None = None) -> Agent:
    """The agent for ``config``, with every installed model loaded.

    ``transport`` reaches the cloud model (``None``: no cloud fallback).

    Raises:
        ConfigError: the provisioned root cannot be read.
        ModelStoreError: the state directory is unusable.
    """
    root_path = Path(config.store.root_path)
    try:
        root = TrustedRoot.from_bytes(root_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the provisioned root {root_path}: {exc}") from exc
    state_dir = Path(config.store.state_dir)
    store = ModelStore(
        state_dir, root, detect_device_profile(), keep_versions=config.store.keep_versions
    )
    capture = None
    if config.capture.enabled:
        try:
            capture = CaptureRing(state_dir / "capture", config.capture)
        except OSError as exc:  # a debugging aid must not stop the agent
            log.error("capture disabled: %s", exc)
    agent = Agent(config, store, capture=capture, transport=transport)
    agent.registry.on_trial = TrialWatch.on_trial()
    agent.start()
    return agent


def build_device(
    config: AgentConfig,
    *,
    log_ring: LogRing | None = None,
    restart: Callable[[], None] | None = None,
) -> tuple[Agent, SyncAgent | None]:
    """The agent and, with ``[sync] enabled``, its fleet-sync loop (not started yet).

    One MQTT session serves both sync and, unless the fallback mode is ``device_only``, the
    cloud-fallback transport. ``log_ring`` and ``restart`` go to the sync loop's remote
    commands (``SyncAgent``).

    Raises:
        ConfigError: the provisioned root or the MQTT settings are unusable.
        TransportError: the device identity's TLS material cannot be loaded.
        ModelStoreError, OutboxError: the state directory is unusable.
    """
    if not config.sync.enabled:
        return build_agent(config), None
    from edge_agent.serving.fallback_mqtt import MqttFallbackTransport
    from edge_agent.sync.loop import SyncAgent, sync_client

    client = sync_client(config)
    transport: FallbackTransport | None = None
    if config.fallback.mode != "device_only":
        transport = MqttFallbackTransport(client, Topics(config.sync.prefix), config.device_id)
    agent = build_agent(config, transport)
    try:
        return agent, SyncAgent(config, agent, client=client, log_ring=log_ring, restart=restart)
    except EdgefleetError:
        agent.close()
        raise


class ControlLoop(threading.Thread):
    """Runs ``agent.tick`` every second and reloads CLI changes; feeds the watchdog.

    The systemd watchdog is pinged from a thread of its own while this loop has made progress
    within ``WATCHDOG_GRACE`` seconds: an install or revert holds the agent's control lock for
    as long as verifying and loading a model takes, which must not get the daemon killed, but a
    loop stuck for longer than the grace is a hang, and systemd restarts the agent.
    """

    def __init__(self, agent: Agent) -> None:
        super().__init__(name="control", daemon=True)
        self.agent = agent
        self.stop = threading.Event()
        self.reload_now = threading.Event()
        self.progress = time.monotonic()
        usec = os.environ.get("WATCHDOG_USEC")
        if usec is not None and usec.isdigit() and int(usec) > 0:
            interval = int(usec) / 1e6 / 3
            threading.Thread(
                target=self._feed_watchdog, args=(interval,), name="watchdog", daemon=True
            ).start()

    def run(self) -> None:
        n = 0
        while not self.stop.wait(TICK_SECONDS):
            n += 1
            try:
                self.agent.tick()
                if self.reload_now.is_set() or n % RELOAD_EVERY_TICKS == 0:
                    self.reload_now.clear()
                    for name in self.agent.reload_changed():
                        log.info("reloaded %s", name)
            except Exception:  # the control loop must survive anything a model throws
                log.exception("control loop error")
            self.progress = time.monotonic()

    def _feed_watchdog(self, interval: float) -> None:
        while not self.stop.wait(interval):
            if time.monotonic() - self.progress < WATCHDOG_GRACE:
                sd_notify("WATCHDOG=1")


def _ready(front: Listeners) -> None:
    log.info("ready: %s", front.describe())
    sd_notify("READY=1")


def release_startup_memory() -> None:
    """Hand back what starting touched and serving does not use (``common.residency``).

    Called once every model is loaded and every front end has started (so grpc, uvicorn and
    the runtimes have done their import-time and load-time work): the malloc heaps' free pages
    go back to the kernel and clean library pages are paged out; those serving uses fault back
    in within its first requests. Measured by ``bench/bench_rss_breakdown.py``
    (docs/agent.md "Memory under load").
    """
    from edge_agent.common.residency import release_library_pages, trim_malloc

    try:
        trim_malloc()
        kib = release_library_pages()
    except Exception:  # best effort: a daemon that could not release memory still serves
        log.exception("releasing start-up memory failed; serving anyway")
        return
    log.info("released %.1f MB of library pages touched only while starting", kib / 1024)


def front_ends(agent: Agent, config: AgentConfig, on_exit: Callable[[], None]) -> Listeners:
    """The daemon's front ends over ``agent``: gRPC (when enabled), then the HTTP API.

    ``on_exit`` is called if the HTTP server stops by itself (the daemon then stops too).

    Raises:
        ConfigError: an API section is invalid.
    """
    from edge_agent.api.app import create_app
    from edge_agent.api.metrics import ApiMetrics
    from edge_agent.api.server import HttpListener, Listener, Listeners
    from edge_agent.serving.metrics import AgentCollector

    metrics = ApiMetrics()
    metrics.registry.register(AgentCollector(agent))
    app = create_app(agent, config.api, metrics)
    listeners: list[Listener] = []
    if config.grpc.enabled:  # grpc is imported only when the gRPC API is on
        from edge_agent.api.grpc_v2.server import GrpcListener
        from edge_agent.api.grpc_v2.service import GrpcInference

        repository = app.state.repository  # set only with [api] repository_control
        servicer = GrpcInference(agent, metrics, app.state.rate_limiter, repository=repository)
        listeners.append(GrpcListener(servicer, config.grpc))
    listeners.append(HttpListener(app, config.api, on_exit=on_exit))
    return Listeners(listeners)


def serve_until_stopped(
    front: Listeners,
    stop: threading.Event,
    drain_seconds: float,
    ready: Callable[[Listeners], None] = _ready,
) -> None:
    """Start every front end, call ``ready``, wait for ``stop``, then drain them all together.

    Raises:
        ConfigError: a front end cannot start (those already started are stopped).
    """
    front.start()
    try:
        ready(front)
        stop.wait()
        log.info("stopping: draining %s", front.describe())
    finally:
        front.drain(drain_seconds)


def trial_check(agent: Agent, sync: SyncAgent | None, serving: threading.Event) -> str | None:
    """``None`` when an agent on trial is healthy, else why not yet (``selfupdate.trial``)."""
    if not serving.is_set():
        return "front ends not started"
    down = agent.not_ready()
    if down:
        return "models not ready: " + ", ".join(sorted(down))[:200]
    if sync is not None and not sync.has_reported():
        return "reported state not published to the fleet server yet"
    return None


def run(config: AgentConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    from edge_agent.api.server import stop_on_signals
    from edge_agent.sync.ops.commands import EXIT_RESTART

    if config.runtime.malloc_arenas:  # before the runtimes, grpc and the pools start threads
        from edge_agent.common.residency import limit_malloc_arenas

        limit_malloc_arenas(config.runtime.malloc_arenas)
    ring = setup_logging(config)
    stop = threading.Event()
    restart_requested = threading.Event()

    def restart() -> None:
        log.warning("restart requested by a signed remote command: draining, exit %d", EXIT_RESTART)
        restart_requested.set()
        stop.set()

    if config.sync.enabled:  # a device provisioned with a claim enrolls before it connects
        from edge_agent.common.enroll import enroll_at_first_boot
        from edge_agent.common.identity import IdentityStore

        enroll_at_first_boot(
            IdentityStore(Path(config.sync.identity_dir)),
            config.device_id,
            wait=threading.Event().wait,
        )
    agent, sync = build_device(config, log_ring=ring, restart=restart)
    if sync is not None:
        sync.start()
        log.info("fleet sync: %s:%d as %s", config.sync.host, config.sync.port, config.device_id)
    control = ControlLoop(agent)
    control.start()
    signal.signal(signal.SIGHUP, lambda *_: control.reload_now.set())
    # Everything loaded so far (runtimes, manifests, baselines) lives as long as the process:
    # keep it out of the cyclic GC's full collections, which otherwise pause serving.
    gc.collect()
    gc.freeze()
    # Each request allocates a few hundred short-lived objects and few cycles: collect the
    # young generation less often (CPython's default, 700, means several collections a request).
    gc.set_threshold(20_000, 50, 100)
    log.info(
        "serving %s on %s:%d%s",
        ", ".join(agent.model_names()) or "no models",
        config.api.host,
        config.api.port,
        f" and {config.api.unix_socket}" if config.api.unix_socket else "",
    )
    serving = threading.Event()
    trial = TrialWatch.from_env(lambda: trial_check(agent, sync, serving))
    if trial is not None:
        trial.start()

    def ready(front: Listeners) -> None:
        if config.runtime.release_startup_memory:
            release_startup_memory()
        _ready(front)
        serving.set()

    try:
        front = front_ends(agent, config, stop.set)
        with stop_on_signals(stop, again=front.abort):
            serve_until_stopped(front, stop, config.api.drain_seconds, ready)
    finally:
        if trial is not None:
            trial.stop()
        sd_notify("STOPPING=1")
        control.stop.set()
        control.join(5)
        if sync is not None:
            sync.close()
        agent.close()
        log.info("stopped")
    return EXIT_RESTART if restart_requested.is_set() else 0
