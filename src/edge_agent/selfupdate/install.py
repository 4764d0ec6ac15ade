"""Stage a verified agent package side by side: a new release virtualenv, built offline.

Owns ``stage_package``, what the running agent (or ``edge-agent agent install``) does with an
agent package file: verify it against the device's root (``edge_agent.bundle.agent_archive``),
refuse a release that already failed its trial here, build ``releases/<n>/`` and move the state
to ``staged``. The launcher does the rest (``edge_agent.selfupdate.launcher``).

The offline scheme, and why: a device has no package index, and the agent's heavy
dependencies (onnxruntime, numpy, cryptography, ...) are platform wheels that rarely change
between agent releases. So a release is a virtualenv made with ``python -m venv --without-pip``
from the base install's interpreter; its ``edgefleet-deps.pth`` adds the base install's
site-packages with ``site.addsitedir`` (so the base's own ``.pth`` files count too), and the
edgefleet wheel alone is installed into it with ``pip install --no-index --no-deps
--ignore-installed`` (pip itself comes from the base install through that ``.pth``). The
release's own site-packages comes first on ``sys.path``, so its ``edge_agent`` shadows the base
install's; nothing in the base install is modified, so every older release and the base
install keep working. A release that needs other dependency versions is a new base install
(docs/operations.md), not a self-update: the signed compatibility (Python version), the smoke
test below (``edge-agent --version`` from the new virtualenv) and the trial catch a wheel that
does not fit.

Every step is restartable: ``release.json`` is written last (durably), and a release directory
without it is removed and rebuilt; the state becomes ``staged`` only after it.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.bundle.agent_archive import LoadedAgentPackage, read_agent_package
from edge_agent.common import durable
from edge_agent.errors import AgentUpdateError
from edge_agent.selfupdate.releases import BASE, Layout, UpdateState, failpoint
from edge_agent.trust import TrustedRoot
from edge_agent.trust.agent_release import AgentHost, AgentRelease

__all__ = ["CONFIG_SCHEMA", "StageResult", "host_profile", "stage_package"]

#: The agent configuration schema this agent reads (a release's ``min_config_schema`` is
#: compared with it).
CONFIG_SCHEMA = 1
STEP_TIMEOUT = 300.0
MAX_OUTPUT = 400
DEPS_PTH = "edgefleet-deps.pth"


@dataclass(frozen=True)
class StageResult:
    """A staged release: the launcher switches to it at its next poll."""

    release: int
    version: str
    previous: str


def host_profile(python: str | None = None) -> AgentHost:
    """This device, for the compatibility check (``python``: ``major.minor`` of the base)."""
    return AgentHost(
        python=python or f"{sys.version_info.major}.{sys.version_info.minor}",
        platform=sys.platform,
        arch=platform.machine(),
        config_schema=CONFIG_SCHEMA,
    )


def stage_package(
    layout: Layout,
    package: Path,
    root: TrustedRoot,
    *,
    now: datetime,
    retry_failed: bool = False,
    check: Callable[[LoadedAgentPackage], None] | None = None,
) -> StageResult:
    """Verify ``package``, build its release virtualenv and move the state to ``staged``.

    ``retry_failed``: try a release again that failed its trial here (an operator's decision,
    e.g. after a trial a power cut interrupted); it is taken off the failed list. ``check``
    runs on the verified package before anything is built (the fleet sync: is it the release
    the desired state names?) and may raise.

    Raises:
        BundleFormatError: not an agent package.
        BundleVerificationError: refused by verification (signature, expiry, rollback,
            digest, compatibility).
        AgentUpdateError: no launcher runs this agent root, an update is already in progress,
            the release failed its trial here before, or building the virtualenv failed.
        TimeoutError: another writer held the agent root's lock too long.
    """
    base = layout.base()
    python, site = base.get("python"), base.get("site")
    if not isinstance(python, str) or not isinstance(site, list) or not site:
        raise AgentUpdateError(
            f"no launcher has run in {layout.root}: start the agent with the launcher first"
        )
    with layout.locked():
        st = layout.load_state()
        if st.state in ("staged", "trying"):
            raise AgentUpdateError(
                f"agent release {st.candidate} is already {st.state}; wait for its outcome"
            )
        current = layout.current()
        loaded = read_agent_package(
            package,
            root,
            now=now,
            installed_release=layout.release_number(current),
            host=host_profile(_python_version(python)),
        )
        if check is not None:
            check(loaded)
        release = loaded.verified.release
        failed = tuple(n for n in st.failed if not (retry_failed and n == release.release))
        if release.release in failed:
            raise AgentUpdateError(
                f"agent release {release.release} failed its trial on this device before"
            )
        _prune(layout, keep={current, st.previous, str(release.release)})
        _build(layout, release, loaded.wheel, python, [str(s) for s in site])
        failpoint("install-before-staged")
        layout.save_state(
            UpdateState(
                state="staged",
                candidate=release.release,
                previous=current,
                failed=failed,
                changed_at=time.time(),
            )
        )
    return StageResult(release.release, release.version, current)


def _python_version(python: str) -> str:
    """``major.minor`` of the base interpreter (the one every release venv is made from)."""
    out = _run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], "python")
    return out.strip()


def _prune(layout: Layout, keep: set[str]) -> None:
    """Remove release directories nothing points at (never the current or previous one)."""
    if not layout.releases.is_dir():
        return
    for d in layout.releases.iterdir():
        if d.name not in keep and d.name != BASE:
            shutil.rmtree(d, ignore_errors=True)


def _build(
    layout: Layout, release: AgentRelease, wheel: bytes, python: str, site: list[str]
) -> None:
    dest = layout.release_dir(str(release.release))
    if dest.exists():  # a build a crash interrupted (complete ones were pruned or kept)
        shutil.rmtree(dest)
    layout.releases.mkdir(parents=True, exist_ok=True)
    try:
        _run([python, "-m", "venv", "--without-pip", str(dest)], "venv")
        failpoint("install-after-venv")
        version = _python_version(str(dest / "bin" / "python"))
        site_packages = dest / "lib" / f"python{version}" / "site-packages"
        # ``site.addsitedir``: the base's own .pth files are processed as the base interpreter
        # processes them (namespace packages, path entries), after this release's site-packages.
        lines = "".join(f"import site; site.addsitedir({s!r})\n" for s in site)
        durable.write_atomic(site_packages / DEPS_PTH, lines.encode())
        wheel_path = dest / release.wheel
        durable.write_atomic(wheel_path, wheel)
        _run(
            [
                str(dest / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-deps",
                "--ignore-installed", "--disable-pip-version-check", "--no-warn-script-location",
                "--quiet", str(wheel_path),
            ],
            "pip install",
        )  # fmt: skip
        wheel_path.unlink()
        failpoint("install-after-pip")
        out = _run([str(dest / "bin" / "edge-agent"), "--version"], "smoke test")
        if release.version not in out.split():
            raise AgentUpdateError(
                f"release {release.release} reports {out.strip()[:80]!r}, "
                f"not version {release.version}"
            )
        info = {**release.to_dict(), "deps": site, "installed_at": time.time()}
        durable.write_atomic(dest / "release.json", _json(info))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _json(doc: object) -> bytes:
    import json

    return json.dumps(doc, sort_keys=True, indent=1).encode()


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentUpdateError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-MAX_OUTPUT:]
        raise AgentUpdateError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout
