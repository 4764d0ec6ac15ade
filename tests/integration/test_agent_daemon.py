"""The real daemon as a process: install while running, serve over TCP and the Unix socket,
roll back by CLI, reject bad input with typed errors, drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.client import AgentClient, AgentRequestError
from edge_agent.config import ApiConfig
from mosquitto import free_port
from support import wait_until

BIN = Path(sys.executable).parent


def agent_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edge-agent"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def daemon(tmp_path: Path, digits_bundles: DigitsBundles):  # type: ignore[no-untyped-def]
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port = free_port()
    sock = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'log_json = true\n[api]\nport = {port}\nunix_socket = "{sock}"\n'
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
        "[model_defaults]\nprobation_requests = 5\n"
    )
    assert agent_cli("install", str(digits_bundles.path(1)), config=config).returncode == 0
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    tcp = AgentClient(ApiConfig(port=port), timeout=5)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("daemon did not become ready: " + (tmp_path / "daemon.log").read_text())
        try:
            return tcp.ready()
        except Exception:
            return False

    try:
        wait_until(ready, 60, lambda: "daemon ready: " + (tmp_path / "daemon.log").read_text())
    except pytest.fail.Exception:
        proc.kill()
        raise
    yield proc, config, tcp, AgentClient(ApiConfig(unix_socket=str(sock)), timeout=5), tmp_path
    if proc.poll() is None:
        proc.kill()
    log.close()


def version_status(config: Path, version: int) -> str | None:
    """The status ``edge-agent models --json`` shows for one version of the (only) model."""
    model = json.loads(agent_cli("models", "--json", config=config).stdout)[0]
    return next((v["status"] for v in model["versions"] if v["version"] == version), None)


def test_daemon_end_to_end(daemon, digits_bundles: DigitsBundles) -> None:  # type: ignore[no-untyped-def]
    proc, config, tcp, uds, tmp_path = daemon
    x = digits_bundles.x_eval[:4]
    out = tcp.infer("digits", {"input": x})
    assert out["parameters"]["model_version"] == "1"
    assert out["parameters"]["inference_source"] == "device"
    pred = np.argmax(np.asarray(out["outputs"][0]["data"]).reshape(4, 10), axis=1)
    assert (pred == digits_bundles.y_eval[:4]).sum() >= 3
    assert uds.infer("digits", {"input": x})["model_version"] == "1"

    # bad input: a typed 400 naming the reason, and the daemon keeps serving
    bad = x.copy()
    bad[0, 3] = np.nan
    with pytest.raises(AgentRequestError) as info:
        tcp.infer("digits", {"input": bad})
    assert info.value.status == 400
    assert "nan" in str(info.value)
    with pytest.raises(AgentRequestError) as info:
        tcp.infer("digits", {"input": np.zeros((2, 7), np.float32)})
    assert info.value.status == 400
    status, _ = tcp.request("POST", "/v2/models/digits/infer", {"inputs": "garbage"})
    assert status == 400
    # FP64 sent to an FP32 input is the protocol's 400 ...
    with pytest.raises(AgentRequestError) as info:
        tcp.infer("digits", {"input": x[:2].astype(np.float64)})
    assert info.value.status == 400
    assert "FP64" in str(info.value)
    # ... while the CLI converts numpy's default float64 files to the declared FP32
    np.save(tmp_path / "x64.npy", x[:2].astype(np.float64))
    run = agent_cli("infer", "digits", str(tmp_path / "x64.npy"), config=config)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["outputs"][0]["shape"] == [2, 10]
    for _ in range(5):
        tcp.infer("digits", {"input": x[:1]})
    wait_until(lambda: version_status(config, 1) == "good", 20, what="v1 passing probation")

    # install v2 while running: the daemon picks it up by itself
    assert agent_cli("install", str(digits_bundles.path(2)), config=config).returncode == 0
    wait_until(
        lambda: tcp.infer("digits", {"input": x[:1]})["model_version"] == "2",
        20,
        what="the daemon reloading v2",
    )
    for _ in range(6):
        tcp.infer("digits", {"input": x[:1]})
    # A control tick judges probation: v2 passes (5 requests) before it is rolled back.
    wait_until(lambda: version_status(config, 2) == "good", 20, what="v2 passing probation")

    # manual rollback through the CLI
    res = agent_cli("rollback", "digits", config=config)
    assert res.returncode == 0, res.stderr
    wait_until(
        lambda: tcp.infer("digits", {"input": x[:1]})["model_version"] == "1",
        20,
        what="the daemon following the rollback",
    )
    state = json.loads(agent_cli("models", "--json", config=config).stdout)[0]
    assert state["active"] == 1
    assert any(e["event"] == "rollback" for e in state["events"])

    metrics = tcp.request("GET", "/metrics")[1]
    assert "edgefleet_api_requests_total" in str(metrics)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "agent.sock").exists()
    lines = [
        json.loads(line)
        for line in (tmp_path / "daemon.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(rec["msg"] == "stopped" for rec in lines)
    os.sync()
