"""Agent packages: the edgefleet wheel plus its release metadata, signed with the targets keys.

Owns building the wheel (``pip wheel --no-deps`` of a source tree), reading its version from
the wheel itself, and ``package_agent``: wheel + release number + compatibility -> the signed
``*.efa`` bytes (layout: ``edge_agent.bundle.agent_archive``; targets layout and the device's
checks: ``edge_agent.trust.agent_release``). The same key store and root of trust as model
bundles: a device verifies an agent package with the keys it verifies models with.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from edge_agent.bundle.agent_archive import agent_package_bytes
from edge_agent.errors import MetadataFormatError
from edge_agent.trust.agent_release import (
    AgentCompatibility,
    AgentRelease,
    make_agent_targets,
)
from model_builder.errors import InputDataError, ModelBuilderError
from model_builder.keystore import KeyStore

__all__ = ["agent_release_for", "build_wheel", "package_agent", "wheel_version"]

_WHEEL_NAME = re.compile(r"edgefleet-([0-9A-Za-z.]+)-py3-none-any\.whl")
BUILD_TIMEOUT = 600.0


def build_wheel(source: Path, out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of the edgefleet source tree ``source``; the wheel's path.

    Raises:
        ModelBuilderError: pip failed or produced no edgefleet wheel.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-w", tmp, str(source)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ModelBuilderError(f"pip wheel failed: {done.stderr.strip()[-400:]}")
        wheels = [p for p in Path(tmp).iterdir() if _WHEEL_NAME.fullmatch(p.name)]
        if len(wheels) != 1:
            raise ModelBuilderError(f"pip wheel made no single edgefleet wheel in {source}")
        target = out_dir / wheels[0].name
        wheels[0].replace(target)
    return target


def wheel_version(wheel: Path) -> str:
    """The version of an edgefleet wheel; its file name and its METADATA must agree.

    Raises:
        InputDataError: not an edgefleet ``py3-none-any`` wheel, or the two versions differ.
    """
    m = _WHEEL_NAME.fullmatch(wheel.name)
    if m is None:
        raise InputDataError(f"{wheel.name!r} is not an edgefleet py3-none-any wheel")
    version = m.group(1)
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = zf.read(f"edgefleet-{version}.dist-info/METADATA").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InputDataError(f"{wheel.name!r} is not a readable edgefleet wheel: {exc}") from exc
    declared = [
        line[len("Version: ") :] for line in meta.splitlines() if line.startswith("Version: ")
    ]
    if declared[:1] != [version]:
        raise InputDataError(f"{wheel.name!r}: METADATA declares another version")
    return version


def agent_release_for(
    wheel: Path,
    *,
    release: int,
    python: str,
    platform: str = "linux",
    arch: Sequence[str] = ("any",),
    min_config_schema: int = 1,
) -> AgentRelease:
    """The release metadata of ``wheel``.

    Raises:
        InputDataError: not an edgefleet wheel, or a release field is invalid.
    """
    version = wheel_version(wheel)
    data = wheel.read_bytes()
    try:
        return AgentRelease(
            release=release,
            version=version,
            wheel=wheel.name,
            wheel_sha256=hashlib.sha256(data).hexdigest(),
            wheel_length=len(data),
            compatibility=AgentCompatibility(python, platform, tuple(arch), min_config_schema),
        )
    except MetadataFormatError as exc:
        raise InputDataError(f"agent release: {exc}") from exc


def package_agent(
    wheel: Path,
    release: AgentRelease,
    store: KeyStore,
    *,
    now: datetime,
    expires_days: int = 365,
    key_labels: Sequence[str] | None = None,
) -> bytes:
    """Sign ``release`` (which must describe ``wheel``) and return the agent package bytes.

    Raises:
        InputDataError: the wheel is not the one ``release`` describes.
        KeyStoreError: no usable targets key.
    """
    data = wheel.read_bytes()
    if (len(data), hashlib.sha256(data).hexdigest()) != (
        release.wheel_length,
        release.wheel_sha256,
    ):
        raise InputDataError("refusing to sign: the release does not describe this wheel")
    targets = make_agent_targets(release, now + timedelta(days=expires_days))
    targets_bytes = store.sign_targets(targets, key_labels)
    return agent_package_bytes(targets_bytes, release.to_bytes(), data)
