"""CPU feature requirements of a bundle and the features a device offers. Pure.

Owns: the spelling of a signed requirement (``compatibility.cpu_features``), parsing the feature
flags out of ``/proc/cpuinfo`` text (x86 ``flags`` lines, aarch64 ``Features`` lines), and the
check of requirements against offered features. Does not own: reading ``/proc/cpuinfo``
(``edge_agent.runtime.device``) or deciding what a build requires (``model_builder.build_parts``).

A requirement is one feature name, or alternatives joined by ``|`` when any one will do:
``"avx512_vnni|avx_vnni"`` is met by AVX-512 VNNI (Cascade Lake and later Xeons, Zen 4) or by
AVX-VNNI (Alder Lake and later cores). Every requirement of a bundle must be met. Names are the
kernel's flag names, lowercase.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from edge_agent.errors import ContractError

_FEATURE_RE = re.compile(r"[a-z0-9_.]{1,32}")
# cpuinfo keys whose value lists the CPU's features: x86 (``flags``), aarch64 and 32-bit ARM
# (``Features``).
_FLAG_KEYS = ("flags", "features")

# What int8 kernels need on each quantization target (``model_builder.quantize.plan.TARGETS``).
# Without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in 16 bits (vpmaddubsw) and
# saturate on full 8-bit weights; a model quantized for ``x86-vnni`` is only correct with VNNI.
VNNI = "avx512_vnni|avx_vnni"
TARGET_CPU_FEATURES: dict[str, tuple[str, ...]] = {"x86": (), "x86-vnni": (VNNI,), "arm64": ()}


def validate_requirements(requirements: Sequence[str]) -> tuple[str, ...]:
    """Check the spelling of signed requirements.

    Raises:
        ContractError: an empty requirement, a name outside ``[a-z0-9_.]{1,32}``, or more than
            16 requirements.
    """
    if len(requirements) > 16:
        raise ContractError("compatibility.cpu_features lists at most 16 requirements")
    for req in requirements:
        if not isinstance(req, str) or not all(
            _FEATURE_RE.fullmatch(alt) for alt in req.split("|")
        ):
            raise ContractError(
                f"compatibility.cpu_features entry {req!r} is not a feature name (or names "
                "joined by '|')"
            )
    return tuple(requirements)


def cpu_features_from_cpuinfo(text: str) -> frozenset[str]:
    """The features every CPU in ``/proc/cpuinfo`` text offers (lowercase). Pure.

    Reads ``flags`` lines (x86) and ``Features`` lines (ARM). With several processors the result
    is what all of them offer (a heterogeneous system schedules a process on any core). Text
    without such lines offers nothing.
    """
    common: frozenset[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in _FLAG_KEYS:
            continue
        flags = frozenset(value.lower().split())
        common = flags if common is None else common & flags
    return common or frozenset()


def unmet_requirements(requirements: Iterable[str], offered: Iterable[str]) -> list[str]:
    """The requirements none of whose alternatives ``offered`` holds. Pure."""
    have = {f.lower() for f in offered}
    return [req for req in requirements if not any(alt in have for alt in req.split("|"))]
