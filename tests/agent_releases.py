"""Agent releases of this very source tree for the self-update tests, and a base install.

``build_releases`` copies the source, bumps the version (and breaks it on purpose for the bad
releases), builds each wheel with ``pip wheel --no-deps`` and signs it as an agent package;
``make_base_venv`` makes a real virtualenv that reaches this checkout's source and its
dependencies, with the ``edge-agent`` console script pip would have written: the base install
a launcher runs from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import edge_agent
from fleet_server.admin.client import AdminClient
from model_builder.agent_package import agent_release_for, build_wheel, package_agent
from model_builder.keystore import KeyStore

SRC = Path(edge_agent.__file__).resolve().parents[1]
REPO = SRC.parent
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Releases:
    """Release 1: good (version 0.1.1); 2: raises at start; 3: fails every golden check."""

    good: Path
    crash: Path
    unhealthy: Path


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _wheel(tmp: Path, version: str, breakage: str) -> Path:
    tree = tmp / f"src-{version}"
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    _patch(tree / "pyproject.toml", 'version = "0.1.0"', f'version = "{version}"')
    _patch(tree / "src/edge_agent/__init__.py", '"0.1.0"', f'"{version}"')
    if breakage == "crash":
        _patch(
            tree / "src/edge_agent/daemon.py",
            '    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""\n',
            '    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""\n'
            '    raise RuntimeError("this release is broken at start")\n',
        )
    if breakage == "unhealthy":
        _patch(
            tree / "src/edge_agent/runtime/golden.py",
            "    failures: list[str] = []\n",
            '    failures: list[str] = ["this release fails every golden check"]\n',
        )
    return build_wheel(tree, tmp / "wheels")


def build_releases(tmp: Path, keys: KeyStore) -> Releases:
    """The three signed agent packages, written under ``tmp``."""
    out = {}
    for n, (version, breakage) in enumerate(
        [("0.1.1", ""), ("0.1.2", "crash"), ("0.1.3", "unhealthy")], start=1
    ):
        wheel = _wheel(tmp, version, breakage)
        rel = agent_release_for(wheel, release=n, python=PY)
        path = tmp / f"edgefleet-agent-{n}.efa"
        path.write_bytes(package_agent(wheel, rel, keys, now=datetime.now(UTC)))
        out[breakage or "good"] = path
    return Releases(**out)


def make_base_venv(base: Path) -> Path:
    """A base install at ``base`` (see the module docstring)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    site = sysconfig.get_paths()["purelib"]
    (base / "lib" / f"python{PY}" / "site-packages" / "edgefleet-test.pth").write_text(
        f"{SRC}\n{site}\n"
    )
    script = base / "bin" / "edge-agent"
    script.write_text(
        f"#!{base}/bin/python\nimport sys\nfrom edge_agent.cli.main import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return base


def launcher_argv(base: Path, root: Path, config: Path, trial_seconds: float) -> list[str]:
    """The launcher as systemd runs it, from the base install."""
    return [
        str(base / "bin" / "python"), "-m", "edge_agent.selfupdate.launcher",
        "--root", str(root), "--trial-seconds", str(trial_seconds),
        "--", "run", "--config", str(config),
    ]  # fmt: skip


def reported(client: AdminClient, device: str) -> dict[str, Any]:
    """``device``'s reported state as the admin API shows it (empty before its first)."""
    found = client.device(device).get("reported")
    return found if isinstance(found, dict) else {}


def agent_part(client: AdminClient, device: str) -> dict[str, Any]:
    """The ``agent`` part (release, launcher state) of ``device``'s reported state."""
    agent = reported(client, device).get("agent")
    return agent if isinstance(agent, dict) else {}


def or_none(call: Callable[[], Any]) -> Any:
    """``call()``, or None when it raises (a server or daemon not up yet)."""
    try:
        return call()
    except Exception:
        return None
