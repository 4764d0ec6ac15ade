"""Pure quantization decisions: CPU targets, graph profile, mode choice, opset clean-up.

Owns: the quantization types per CPU target (onnxruntime's own CPU guidance), reading the target
from CPU flags, what a float graph looks like to the quantizer (Conv present? MatMul-dominated?),
resolving the requested mode, and removing unused opset imports. No files, no onnxruntime:
``quantize_onnx`` does the I/O. Does not own: running the quantizer or measuring accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_builder.errors import InputDataError, QuantizationError

MODES = ("static", "dynamic", "fp16", "auto")
MATMUL_DOMINANCE = 0.8  # share of weight values in MatMul/Gemm for "MatMul-dominated"
_CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


@dataclass(frozen=True)
class TargetProfile:
    """Quantization types for one CPU family (onnxruntime's own CPU guidance)."""

    name: str
    activation_type: str
    weight_type: str
    reduce_range: bool


TARGETS: Mapping[str, TargetProfile] = {
    # Without VNNI, u8 x s8 products accumulate in 16 bits (vpmaddubsw) and can saturate:
    # 7-bit weights (reduce_range) keep sums in range.
    "x86": TargetProfile("x86", "QUInt8", "QInt8", reduce_range=True),
    "x86-vnni": TargetProfile("x86-vnni", "QUInt8", "QInt8", reduce_range=False),
    "arm64": TargetProfile("arm64", "QInt8", "QInt8", reduce_range=False),
}


def target_from_cpu(cpu_flags: str, machine: str) -> str:
    """Pick the quantization target from CPU flags (``/proc/cpuinfo`` text) and machine name.

    Args:
        cpu_flags: text holding the CPU's feature flags, e.g. the whole of ``/proc/cpuinfo``.
        machine: ``platform.machine()``, e.g. ``x86_64``, ``AMD64``, ``aarch64``, ``arm64``.

    Returns:
        ``"x86"``, ``"x86-vnni"`` or ``"arm64"``.

    Raises:
        QuantizationError: the machine is neither x86-64 nor 64-bit ARM.
    """
    arch = machine.strip().lower()
    if arch in ("aarch64", "arm64", "armv8l", "armv8b") or arch.startswith("armv9"):
        return "arm64"
    if arch in ("x86_64", "amd64", "x64", "i386", "i686", "x86"):
        flags = set(cpu_flags.lower().split())
        vnni = {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni", "amx_int8"}
        return "x86-vnni" if flags & vnni else "x86"
    raise QuantizationError(
        f"no quantization target for machine {machine!r}; pass one of {sorted(TARGETS)} explicitly"
    )


@dataclass(frozen=True)
class GraphProfile:
    """What the quantizer needs to know about a float graph."""

    op_counts: Mapping[str, int]
    has_conv: bool
    weight_values: int
    matmul_weight_share: float

    @property
    def matmul_dominated(self) -> bool:
        return self.matmul_weight_share >= MATMUL_DOMINANCE


def profile_graph(model: Any) -> GraphProfile:
    """Count ops and the share of weight values read by MatMul/Gemm in an ``onnx.ModelProto``."""
    inits = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    counts: dict[str, int] = {}
    matmul = 0
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type in ("MatMul", "Gemm"):
            matmul += sum(inits.get(i, 0) for i in node.input[:2])
    total = sum(inits.values())
    return GraphProfile(
        op_counts=counts,
        has_conv=bool(_CONV_OPS & counts.keys()),
        weight_values=total,
        matmul_weight_share=matmul / total if total else 0.0,
    )


def choose_mode(requested: str, graph: GraphProfile, has_calibration: bool) -> str:
    """Resolve ``requested`` (one of ``MODES``) to the mode that will run.

    Raises:
        QuantizationError: unknown mode, or ``dynamic`` on a graph it does not suit.
        InputDataError: ``static`` (or ``auto`` on a Conv model) without calibration data.
    """
    if requested not in MODES:
        raise QuantizationError(f"unknown quantization mode {requested!r}; use one of {MODES}")
    if requested == "auto":
        if has_calibration:
            return "static"
        if graph.matmul_dominated and not graph.has_conv:
            return "dynamic"
        raise InputDataError(
            "mode auto needs calibration data for a graph that is not "
            "MatMul-dominated (static int8 calibrates activation ranges)"
        )
    if requested == "dynamic":
        if graph.has_conv:
            raise QuantizationError(
                "dynamic quantization refused: the graph has Conv, and onnxruntime runs "
                "dynamically quantized Conv (ConvInteger) several times slower than float; "
                "use static with calibration data"
            )
        if not graph.matmul_dominated:
            raise QuantizationError(
                f"dynamic quantization refused: MatMul/Gemm hold only "
                f"{graph.matmul_weight_share:.0%} of the weights (needs {MATMUL_DOMINANCE:.0%})"
            )
    if requested == "static" and not has_calibration:
        raise InputDataError("static quantization needs calibration data")
    return requested


def strip_unused_opsets(model: Any) -> tuple[str, ...]:
    """Remove opset imports of domains no node uses (in place); the default domain stays.

    Older runtimes refuse models importing domains they do not know, even unused ones.

    Returns:
        The removed domains, sorted.
    """
    used: set[str] = set()
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            used.add(node.domain)
            for attr in node.attribute:  # If/Loop/Scan bodies
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    used.update(f.domain for f in model.functions)
    keep = [o for o in model.opset_import if o.domain in _DEFAULT_DOMAINS or o.domain in used]
    removed = sorted({o.domain for o in model.opset_import} - {o.domain for o in keep})
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return tuple(removed)
