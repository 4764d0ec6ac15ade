"""Daemon process concerns: systemd notifications, JSON logs, front ends and SIGTERM."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent import daemon
from edge_agent.api.server import Listeners
from edge_agent.client import AgentClient
from edge_agent.config import AgentConfig, ApiConfig, GrpcConfig, StoreConfig
from edge_agent.daemon import JsonFormatter, sd_notify
from edge_agent.errors import ConfigError


def test_sd_notify_reaches_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert sock.recv(64) == b"READY=1"
        assert sd_notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_sd_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not sd_notify("READY=1")  # a missing socket never crashes the daemon


def test_json_log_lines_are_parseable() -> None:
    record = logging.LogRecord(
        "edge_agent.x", logging.WARNING, __file__, 1, "rolled back %s", ("digits",), None
    )
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["msg"]) == (
        "warning",
        "edge_agent.x",
        "rolled back digits",
    )


class _SlowAgent:
    """An agent whose tick holds the control loop (as an install holding its lock does)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def tick(self) -> None:
        self.release.wait(10)

    def reload_changed(self) -> list[str]:
        return []


class _CountingStop(threading.Event):
    """The control loop's stop event, counting the watchdog thread's waits (one per round)."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self._counted = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "watchdog":
            with self._counted:
                self.rounds += 1
                self._counted.notify_all()
        return super().wait(timeout)

    def wait_rounds(self, n: int) -> None:
        """Wait until the watchdog has begun ``n`` more rounds."""
        with self._counted:
            target = self.rounds + n
            assert self._counted.wait_for(lambda: self.rounds >= target, 10), "watchdog stuck"


def test_watchdog_is_fed_while_the_loop_is_held_within_the_grace_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(1.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "300000")  # pinged every 0.1 s
        agent = _SlowAgent()
        loop = daemon.ControlLoop(agent)  # type: ignore[arg-type]
        stop = loop.stop = _CountingStop()  # the watchdog reads it again every round
        loop.start()
        try:
            # The loop is stuck in tick (an install), but within the grace: still fed.
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"
            # Past the grace, a stuck loop is a hang: the pings stop and systemd restarts it.
            loop.progress -= daemon.WATCHDOG_GRACE + 1
            # A round that read the old progress has pinged before the next round begins.
            stop.wait_rounds(1)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(20):  # drain what was already sent (bounded: a bug keeps pinging)
                    sock.recv(64)
            stop.wait_rounds(2)  # at least one whole round since, on the stale progress
            with pytest.raises(BlockingIOError):
                sock.recv(64)
        finally:
            loop.stop.set()
            agent.release.set()
            loop.join(5)


# ------------------------------------------------------------------- front ends and SIGTERM
class _Front:
    """A front end that records what the daemon asks of it."""

    def __init__(self, name: str, log: list[tuple[object, ...]], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def start(self) -> None:
        if self.fail:
            raise ConfigError(f"{self.name} cannot listen")
        self.log.append(("start", self.name))

    def begin_drain(self, grace: float) -> None:
        self.log.append(("begin_drain", self.name, grace))

    def wait_drained(self) -> None:
        self.log.append(("wait_drained", self.name))

    def describe(self) -> str:
        return self.name


def test_stop_drains_every_front_end_together() -> None:
    log: list[tuple[object, ...]] = []
    front = Listeners([_Front("grpc", log), _Front("http", log), _Front("unix", log)])
    stop, ready = threading.Event(), threading.Event()
    runner = threading.Thread(
        target=daemon.serve_until_stopped,
        args=(front, stop, 7.5),
        kwargs={"ready": lambda _: ready.set()},
    )
    runner.start()
    assert ready.wait(10)
    assert log == [("start", "grpc"), ("start", "http"), ("start", "unix")]
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    # Every front end stops accepting before the daemon waits for any of them.
    assert log[3:] == [
        ("begin_drain", "grpc", 7.5),
        ("begin_drain", "http", 7.5),
        ("begin_drain", "unix", 7.5),
        ("wait_drained", "grpc"),
        ("wait_drained", "http"),
        ("wait_drained", "unix"),
    ]


def test_a_front_end_that_cannot_start_stops_those_started() -> None:
    log: list[tuple[object, ...]] = []
    front = Listeners([_Front("grpc", log), _Front("http", log, fail=True)])
    ready: list[object] = []
    with pytest.raises(ConfigError, match="http cannot listen"):
        daemon.serve_until_stopped(front, threading.Event(), 5.0, ready=ready.append)
    assert ready == []
    assert log == [("start", "grpc"), ("begin_drain", "grpc", 0.0), ("wait_drained", "grpc")]


def test_the_daemon_owns_sigterm_and_drains_http_unix_and_grpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_bundles: DigitsBundles
) -> None:
    """``daemon.run`` in this (main) thread: SIGTERM reaches the daemon's handler, not a server;
    every front end stops, the socket files go, and ``run`` returns 0 with the process alive."""
    assert threading.current_thread() is threading.main_thread()
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    sock, grpc_sock = tmp_path / "api.sock", tmp_path / "grpc.sock"
    config = AgentConfig(
        api=ApiConfig(port=0, unix_socket=str(sock), drain_seconds=5.0),
        grpc=GrpcConfig(enabled=True, port=0, unix_socket=str(grpc_sock)),
        store=StoreConfig(state_dir=str(tmp_path / "state"), root_path=str(tmp_path / "root.json")),
    )
    notified: list[str] = []
    ready = threading.Event()

    def notify(message: str) -> bool:
        notified.append(message)
        if message == "READY=1":
            ready.set()
        return True

    monkeypatch.setattr(daemon, "sd_notify", notify)
    monkeypatch.setattr(daemon, "setup_logging", lambda _: None)  # keep pytest's log capture
    monkeypatch.setattr(gc, "freeze", lambda: None)  # process-wide: not in a test run
    monkeypatch.setattr(gc, "set_threshold", lambda *_: None)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    answers: dict[str, object] = {}

    def client() -> None:
        try:
            if ready.wait(60):
                api = AgentClient(ApiConfig(unix_socket=str(sock)), timeout=5)
                answers["unix_live"] = api.request("GET", "/v2/health/live")[0]
                answers["grpc_socket"] = grpc_sock.exists()
        finally:
            # Stop the daemon as systemd does, but never kill the test run: only while the
            # daemon's own handler is installed.
            if signal.getsignal(signal.SIGTERM) is not previous[signal.SIGTERM]:
                os.kill(os.getpid(), signal.SIGTERM)

    caller = threading.Thread(target=client)
    caller.start()
    try:
        assert daemon.run(config) == 0
    finally:
        caller.join(10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert answers == {"unix_live": 200, "grpc_socket": True}
    assert notified == ["READY=1", "STOPPING=1"]
    assert not sock.exists()  # the HTTP API's socket file is removed at shutdown
    assert not grpc_sock.exists()  # and gRPC's
    # The daemon's handlers are gone again: what was installed before is back.
    assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
