"""This device's profile (architecture, installed runtimes), read from the running system.

The I/O edge for ``DeviceProfile``: the pure compatibility check takes the profile as a value.
"""

from __future__ import annotations

import platform
from pathlib import Path

from edge_agent.contract import DeviceProfile, normalise_arch
from edge_agent.contract.cpu import cpu_features_from_cpuinfo
from edge_agent.runtime.loader import installed_runtime_version


def detect_device_profile(cpuinfo: Path = Path("/proc/cpuinfo")) -> DeviceProfile:
    """Architecture from ``platform.machine()``, the versions of installed runtimes, and the CPU
    feature flags from ``cpuinfo`` (Linux; elsewhere the features are unknown, None)."""
    runtimes = {
        name: version
        for name in ("onnxruntime", "litert")
        if (version := installed_runtime_version(name)) is not None
    }
    try:
        features: frozenset[str] | None = cpu_features_from_cpuinfo(
            cpuinfo.read_text(encoding="utf-8", errors="replace")
        )
    except OSError:
        features = None
    return DeviceProfile(
        arch=normalise_arch(platform.machine()), runtimes=runtimes, cpu_features=features
    )
