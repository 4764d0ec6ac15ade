"""Daemon process concerns: systemd notifications and JSON logs."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from edge_agent import daemon
from edge_agent.daemon import JsonFormatter, sd_notify


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
        loop.start()
        try:
            # The loop is stuck in tick (an install), but within the grace: still fed.
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"
            # Past the grace, a stuck loop is a hang: the pings stop and systemd restarts it.
            loop.progress -= daemon.WATCHDOG_GRACE + 1
            time.sleep(0.3)
            sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                for _ in range(20):  # drain what was already sent (bounded: a bug keeps pinging)
                    sock.recv(64)
            with pytest.raises(TimeoutError):
                sock.recv(64)
        finally:
            loop.stop.set()
            agent.release.set()
            loop.join(5)
