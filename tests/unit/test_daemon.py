"""Daemon process concerns: systemd notifications and JSON logs."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

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
