"""This device's profile (architecture, installed runtimes), read from the running system.

The I/O edge for ``DeviceProfile``: the pure compatibility check takes the profile as a value.
"""

from __future__ import annotations

import platform

from edge_agent.contract import DeviceProfile, normalise_arch
from edge_agent.runtime.base import installed_runtime_version


def detect_device_profile() -> DeviceProfile:
    """Architecture from ``platform.machine()`` and the versions of installed runtimes."""
    runtimes = {
        name: version
        for name in ("onnxruntime", "litert")
        if (version := installed_runtime_version(name)) is not None
    }
    return DeviceProfile(arch=normalise_arch(platform.machine()), runtimes=runtimes)
