"""The real daemon with one model that cannot serve beside one that can.

``digits`` has only v4 installed, whose signed golden samples lie (its health check fails on a
real onnxruntime session, and nothing good is kept to fall back to); ``pager`` is a good model.
The daemon must say why ``digits`` is down once (not on every reload), keep the cause in the
store (``edge-agent status``, a restart), name it in readiness, and serve ``pager`` throughout.
Each ``edge-agent install`` of a new pager version below is picked up by the daemon's reload
pass, so the test knows reload passes ran while ``digits`` was down, without sleeping.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from bundles import DigitsBundles
from edge_agent.bundle import read_bundle
from fleet import start_daemon, stop_process, wait_until
from model_builder.package import package_bundle
from mosquitto import free_port

BIN = Path(sys.executable).parent


def _cli(*args: str | Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edge-agent"), *map(str, args), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pager(bundles: DigitsBundles, version: int, out: Path) -> Path:
    """The good digits model, signed under another name ("pager")."""
    good = read_bundle(
        bundles.path(1),
        bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    manifest = dataclasses.replace(good.manifest, name="pager", version=version)
    path = out / f"pager-{version}.efb"
    path.write_bytes(package_bundle(manifest, good.artifact, bundles.keys, now=datetime.now(UTC)))
    return path


@pytest.fixture
def setup(tmp_path: Path, digits_bundles: DigitsBundles) -> tuple[Path, int]:
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[api]\nport = {port}\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    for bundle in (digits_bundles.path(4, "badgolden"), _pager(digits_bundles, 1, tmp_path)):
        out = _cli("install", bundle, config=config)
        assert out.returncode == 0, out.stderr
    return config, port


def _get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None


def _status(port: int, path: str, code: int) -> httpx.Response | None:
    r = _get(port, path)
    return r if r is not None and r.status_code == code else None


def _count(log: Path, text: str) -> int:
    return log.read_text().count(text)


def test_a_model_down_is_said_once_kept_and_named_while_the_other_serves(
    setup: tuple[Path, int], digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    config, port = setup
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        ready = wait_until(
            lambda: _status(port, "/v2/health/ready", 503),
            timeout=60,
            what="the daemon answering readiness",
        )
        assert "digits" in ready.json()["error"]
        assert "golden samples failed" in ready.json()["models"]["digits"]
        assert "pager" not in ready.json()["models"]
        model = _get(port, "/v2/models/digits/ready")
        assert model is not None
        assert model.status_code == 503
        assert "golden samples failed" in model.json()["error"]
        pager = _get(port, "/v2/models/pager/ready")
        assert pager is not None
        assert pager.status_code == 200
        rows = digits_bundles.x_eval[:2].tolist()
        body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": rows}]}
        infer = httpx.post(f"http://127.0.0.1:{port}/v2/models/pager/infer", json=body, timeout=10)
        assert infer.status_code == 200, infer.text

        # Reload passes run (each new pager version is picked up by one) while digits is down.
        for version in (2, 3):
            out = _cli("install", _pager(digits_bundles, version, tmp_path), config=config)
            assert out.returncode == 0, out.stderr
            wait_until(
                lambda v=version: f"loaded pager v{v}" in log.read_text(),
                timeout=60,
                what=f"pager v{version} picked up",
            )
        assert _count(log, "digits v4 not served") == 1, log.read_text()
        assert _count(log, "reloaded digits") == 0
        assert _count(log, "cannot roll back") == 0

        status = _cli("status", "--json", config=config)
        digits = next(m for m in json.loads(status.stdout)["models"] if m["name"] == "digits")
        assert digits["down"]["version"] == 4
        assert "golden samples failed" in digits["down"]["reason"]
        text = _cli("status", config=config).stdout
        assert any(line.startswith("digits") and "DOWN" in line for line in text.splitlines())
    finally:
        stop_process(proc)
    # A restart reads the cause back from the store (and says it once in its own log).
    log2 = tmp_path / "daemon2.log"
    proc = start_daemon(config, log2)
    try:
        wait_until(
            lambda: _status(port, "/v2/models/pager/ready", 200),
            timeout=60,
            what="the restarted daemon serving pager",
        )
        ready = _get(port, "/v2/health/ready")
        assert ready is not None
        assert ready.status_code == 503
        assert "golden samples failed" in ready.json()["models"]["digits"]
        assert _count(log2, "digits v4 not served") == 1
    finally:
        stop_process(proc)
