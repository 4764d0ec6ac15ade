"""The parts of a manifest the build computes after quantization: measurements, golden
samples, compatibility, tool versions and the report dict. Pure helpers of ``build``."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract import Compatibility, GoldenSample, OutputContract
from edge_agent.contract.cpu import TARGET_CPU_FEATURES
from edge_agent.runtime.base import Runtime
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.evaluate.gate import GateOutcome
from model_builder.evaluate.perf import PerfReport, measure_perf

Array = npt.NDArray[Any]

ARCH_FOR_TARGET = {"x86": ("x86_64",), "x86-vnni": ("x86_64",), "arm64": ("aarch64",)}
# Lowest onnxruntime release that implements each default-domain opset.
_ORT_FOR_OPSET = {
    13: "1.8",
    14: "1.9",
    15: "1.10",
    16: "1.11",
    17: "1.13",
    18: "1.14",
    19: "1.16",
    20: "1.17",
    21: "1.18",
    22: "1.20",
    23: "1.22",
}


# ------------------------------------------------------------------------ measuring, golden
def preprocess(ds: Dataset, pre: Mapping[str, Any], dtypes: Mapping[str, str]) -> dict[str, Array]:
    return {
        name: pre[name].apply(np.asarray(x), dtypes.get(name, "float32"))
        for name, x in ds.inputs.items()
    }


def run_all(
    runtime: Runtime, ds: Dataset, pre: Mapping[str, Any], batch: int = 64
) -> dict[str, Array]:
    dtypes = {i.name: i.dtype for i in runtime.inputs}
    feeds = preprocess(ds, pre, dtypes)
    chunks: dict[str, list[Array]] = {}
    for start in range(0, len(ds), batch):
        out = runtime.run({k: v[start : start + batch] for k, v in feeds.items()})
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def measure_both(
    f_rt: Runtime,
    q_rt: Runtime,
    ds: Dataset,
    pre: Mapping[str, Any],
    f_size: int,
    q_size: int,
    timed: bool,
) -> dict[str, PerfReport | None]:
    if not timed:
        return {"float": None, "quantized": None}
    samples = {
        k: v[:64] for k, v in preprocess(ds, pre, {i.name: i.dtype for i in f_rt.inputs}).items()
    }
    return {
        "float": measure_perf(f_rt, samples, f_size, max_seconds=1.0),
        "quantized": measure_perf(q_rt, samples, q_size, max_seconds=1.0),
    }


def golden_samples(
    runtime: Runtime, ds: Dataset, pre: Mapping[str, Any], outputs: OutputContract, count: int
) -> tuple[GoldenSample, ...]:
    """Golden samples the model answers confidently, so another CPU's rounding cannot flip them.

    For classification, samples whose top-two probability margin is at least 0.2 are preferred;
    expected outputs get ``atol`` 0.05 (int8 kernels differ slightly between CPU families).
    """
    if count <= 0:
        return ()
    pool = ds.take(min(len(ds), 256))
    results = run_all(runtime, pool, pre)
    order = np.arange(len(pool))
    score_name = outputs.score_output
    if outputs.task == "classification" and score_name is not None:
        scores = results[score_name].reshape(len(pool), -1)
        top2 = np.sort(scores, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        order = np.argsort(-margin, kind="stable")[: max(count * 4, count)]
        order = np.sort(order)
    golden = []
    for i in order[:count]:
        label = None
        if score_name is not None and outputs.task == "classification":
            label = int(np.argmax(results[score_name][i]))
        golden.append(
            GoldenSample(
                inputs={k: np.asarray(v[i : i + 1]).tolist() for k, v in pool.inputs.items()},
                expected={
                    k: np.round(v[i : i + 1].astype(np.float64), 6).tolist()
                    for k, v in results.items()
                },
                atol=0.05,
                rtol=0.0,
                label=label,
            )
        )
    return tuple(golden)


# --------------------------------------------------------------------------------- metadata
def compatibility(
    fmt: str, model: bytes, recipe: Mapping[str, Any], target: str, config: BuildConfig
) -> Compatibility:
    if fmt == "tflite":
        return Compatibility(
            runtime="litert", min_runtime_version="1.2", arch=config.arch or ("any",)
        )
    import onnx

    proto = onnx.load_from_string(model)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}
    main = opsets.get("ai.onnx", 13)
    min_ort = _ORT_FOR_OPSET.get(main, "1.8" if main < 13 else max(_ORT_FOR_OPSET.values()))
    int8 = recipe.get("mode") in ("static", "dynamic")
    arch = config.arch or (ARCH_FOR_TARGET.get(target, ("any",)) if int8 else ("any",))
    # Signed with the rest: a bundle quantized for VNNI must not install where it computes wrong.
    features = TARGET_CPU_FEATURES.get(target, ()) if int8 else ()
    return Compatibility(
        runtime="onnxruntime",
        min_runtime_version=min_ort,
        arch=arch,
        opsets=opsets,
        cpu_features=features,
    )


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in (
        "edgefleet",
        "onnx",
        "onnxruntime",
        "numpy",
        "ai-edge-litert",
        "ai-edge-quantizer",
        "onnxconverter-common",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_report(
    outcome: GateOutcome,
    recipe: Mapping[str, Any],
    cal_stats: Mapping[str, Any],
    perf: Mapping[str, PerfReport | None],
    seconds: float,
    target: str,
    config: BuildConfig,
    sizes: tuple[int, int],
) -> dict[str, Any]:
    v = outcome.verdict
    return {
        "mode": recipe.get("mode", config.mode),
        "target": target,
        "metric": outcome.float_metrics.metric,
        "float": {
            "value": v.float_value,
            "size_bytes": sizes[0],
            "perf": perf["float"].to_dict() if perf["float"] else None,
        },
        "quantized": {
            "value": v.quant_value,
            "size_bytes": sizes[1],
            "perf": perf["quantized"].to_dict() if perf["quantized"] else None,
        },
        "agreement": v.agreement,
        "gate": {
            "passed": v.passed,
            "abs_drop": v.abs_drop,
            "rel_drop": v.rel_drop,
            "warnings": list(v.warnings),
            "reasons": list(v.reasons),
            "policy": {
                "max_abs_drop": config.policy.max_abs_drop,
                "max_rel_drop": config.policy.max_rel_drop,
                "min_agreement": config.policy.min_agreement,
            },
        },
        "excluded_nodes": list(outcome.rescue.excluded) if outcome.rescue else [],
        "rescue": outcome.rescue.to_dict() if outcome.rescue else None,
        "calibration": dict(cal_stats),
        "eval_samples": outcome.float_metrics.samples,
        "build_seconds": round(seconds, 3),
    }
