"""``model-builder build``: float model in, signed bundle and report out.

Owns the order of the steps and nothing else: quantize (``quantize_onnx`` / ``quantize_tflite``),
gate with the agent's own runtime adapters (``gate``), measure (``perf``), compute the drift
baseline with the device's code (``edge_agent.drift``), choose golden samples, fill in the
manifest, and sign (``package``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract import (
    BundleManifest,
    Compatibility,
    GoldenSample,
    InputContract,
    OutputContract,
    Provenance,
)
from edge_agent.drift import build_baseline
from edge_agent.runtime.base import Runtime, RuntimeOptions, load_runtime
from model_builder.calibration import CalibrationSource, ProgressFn, calibration_stats
from model_builder.data import Dataset
from model_builder.errors import AccuracyGateError, InputDataError
from model_builder.gate import (
    GateOutcome,
    GatePolicy,
    Metrics,
    evaluate,
    judge,
    measure_onnx,
    quantize_with_gate,
)
from model_builder.keystore import KeyStore
from model_builder.package import artifact_ref, package_bundle
from model_builder.perf import PerfReport, measure_perf
from model_builder.quantize_onnx import QuantizedModel, detect_target, quantize_onnx
from model_builder.report import render_table

Array = npt.NDArray[Any]

TFLITE_RECIPES = {
    "static": "static_wi8_ai8",
    "dynamic": "dynamic_wi8_afp32",
    "auto": "static_wi8_ai8",
}
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


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``target=None`` detects the host CPU; ``arch=None`` follows the target."""

    name: str
    version: int
    channel: str = "stable"
    mode: str = "static"
    target: str | None = None
    arch: tuple[str, ...] | None = None
    policy: GatePolicy = field(default_factory=GatePolicy)
    rescue: bool = True
    max_exclusions: int = 8
    n_bins: int = 10
    kll_k: int | None = None
    golden: int = 8
    expires_days: int = 365
    measure_latency: bool = True


@dataclass(frozen=True)
class BuildResult:
    """The signed bundle bytes, its manifest, and the report (also inside the manifest)."""

    bundle: bytes
    manifest: BundleManifest
    report: dict[str, Any]


def build_bundle(
    model_bytes: bytes,
    fmt: str,
    calib: Dataset,
    evaluation: Dataset,
    contract: tuple[InputContract, OutputContract],
    config: BuildConfig,
    store: KeyStore,
    *,
    now: datetime,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Quantize, gate, baseline, package and sign one model.

    Raises:
        InputDataError: the evaluation data has no labels, or does not fit the model.
        ModelCheckError, QuantizationError: the model or the quantizer failed.
        AccuracyGateError: the quantized model failed the gate and no rescue passed.
        KeyStoreError: no usable signing key.
    """
    inputs, outputs = contract
    if evaluation.labels is None:
        raise InputDataError("evaluation data needs labels (y) for the accuracy gate")
    pre = {t.name: t.preprocessing for t in inputs.tensors}
    started = time.perf_counter()
    if fmt == "onnx":
        target = config.target or detect_target()
        outcome, quantized, recipe, cal_stats = _quantize_onnx(
            model_bytes, calib, evaluation, inputs, outputs, config, target, progress
        )
    elif fmt == "tflite":
        target = config.target or detect_target()
        outcome, quantized, recipe, cal_stats = _quantize_tflite(
            model_bytes, calib, evaluation, inputs, outputs, config, progress
        )
    else:
        raise InputDataError(f"unsupported model format {fmt!r}")
    build_seconds = time.perf_counter() - started

    q_runtime = load_runtime(quantized, fmt, RuntimeOptions(warmup_runs=1))
    f_runtime = load_runtime(model_bytes, fmt, RuntimeOptions(warmup_runs=1))
    try:
        perf = _perf(
            f_runtime,
            q_runtime,
            evaluation,
            pre,
            len(model_bytes),
            len(quantized),
            config.measure_latency,
        )
        baseline_outputs = _run_all(q_runtime, calib, pre)
        golden = _golden(q_runtime, evaluation, pre, outputs, config.golden)
    finally:
        f_runtime.close()
    q_runtime.close()

    baseline = build_baseline(
        calib.inputs, baseline_outputs, n_bins=config.n_bins, kll_k=config.kll_k
    )
    report = _report(
        outcome,
        recipe,
        cal_stats,
        perf,
        build_seconds,
        target,
        config,
        (len(model_bytes), len(quantized)),
    )
    report["table"] = render_table(report)
    manifest = BundleManifest(
        name=config.name,
        version=config.version,
        channel=config.channel,
        artifact=artifact_ref(quantized, fmt),
        inputs=inputs,
        outputs=outputs,
        baseline=baseline,
        golden=golden,
        compatibility=_compatibility(fmt, quantized, recipe, target, config),
        provenance=Provenance(
            source_sha256=hashlib.sha256(model_bytes).hexdigest(),
            source_format=fmt,
            recipe=recipe,
            tool_versions=_tool_versions(),
            built_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ),
        report=report,
    )
    bundle = package_bundle(manifest, quantized, store, now=now, expires_days=config.expires_days)
    return BuildResult(bundle, manifest, report)


# ----------------------------------------------------------------------------- quantization
def _quantize_onnx(
    model_bytes: bytes,
    calib: Dataset,
    evaluation: Dataset,
    inputs: InputContract,
    outputs: OutputContract,
    config: BuildConfig,
    target: str,
    progress: ProgressFn | None,
) -> tuple[GateOutcome, bytes, dict[str, Any], dict[str, Any]]:
    source = CalibrationSource.from_contract(calib.inputs, inputs)
    pre = {t.name: t.preprocessing for t in inputs.tensors}
    assert evaluation.labels is not None

    def quantize(excluded: tuple[str, ...]) -> QuantizedModel:
        return quantize_onnx(model_bytes, source, config.mode, target, excluded, progress=progress)

    def measure(model: bytes) -> Metrics:
        assert evaluation.labels is not None
        return measure_onnx(
            model, dict(evaluation.inputs), evaluation.labels, pre, outputs, progress=progress
        )

    if config.rescue:
        outcome = quantize_with_gate(
            model_bytes,
            quantize,
            measure,
            config.policy,
            max_exclusions=config.max_exclusions,
            progress=progress,
        )
    else:
        plain = quantize(())
        float_m, quant_m = measure(model_bytes), measure(plain.model_bytes)
        verdict = judge(float_m, quant_m, config.policy)
        if not verdict.passed:
            raise AccuracyGateError(
                "quantized model failed the accuracy gate: " + "; ".join(verdict.reasons),
                {"initial": verdict.to_dict(), "calibration": dict(plain.calibration_stats)},
            )
        outcome = GateOutcome(plain, float_m, quant_m, verdict)
    q = outcome.model
    return outcome, q.model_bytes, q.recipe.to_dict(), dict(q.calibration_stats)


def _quantize_tflite(
    model_bytes: bytes,
    calib: Dataset,
    evaluation: Dataset,
    inputs: InputContract,
    outputs: OutputContract,
    config: BuildConfig,
    progress: ProgressFn | None,
) -> tuple[GateOutcome, bytes, dict[str, Any], dict[str, Any]]:
    from model_builder.quantize_tflite import quantize_tflite

    recipe_name = TFLITE_RECIPES.get(config.mode)
    if recipe_name is None:
        raise InputDataError(
            f"mode {config.mode!r} is not available for TFLite; use {', '.join(TFLITE_RECIPES)}"
        )
    source = CalibrationSource.from_contract(calib.inputs, inputs)
    samples = [
        {name: source.preprocessed(name)[i : i + 1] for name in source.raw}
        for i in range(source.num_samples)
    ]
    result = quantize_tflite(model_bytes, recipe_name, samples)
    pre = {t.name: t.preprocessing for t in inputs.tensors}
    assert evaluation.labels is not None
    metrics = []
    for model in (model_bytes, result.model):
        runtime = load_runtime(model, "tflite")
        try:
            metrics.append(
                evaluate(
                    runtime,
                    dict(evaluation.inputs),
                    evaluation.labels,
                    pre,
                    outputs,
                    progress=progress,
                )
            )
        finally:
            runtime.close()
    verdict = judge(metrics[0], metrics[1], config.policy)
    stats = calibration_stats(source)
    if not verdict.passed:
        # The float-fallback search edits ONNX graphs; for TFLite the fix is a different recipe.
        raise AccuracyGateError(
            f"TFLite {recipe_name} failed the accuracy gate: {'; '.join(verdict.reasons)}; try "
            "--mode dynamic",
            {"initial": verdict.to_dict(), "calibration": stats},
        )
    outcome = GateOutcome(_tflite_as_quantized(result.model), metrics[0], metrics[1], verdict)
    return outcome, result.model, {"mode": config.mode, **result.report.to_dict()}, stats


def _tflite_as_quantized(model: bytes) -> QuantizedModel:
    """GateOutcome carries a QuantizedModel; TFLite has no recipe record of that shape."""
    from model_builder.quantize_onnx import QuantRecipe

    recipe = QuantRecipe(
        mode="tflite",
        requested_mode="tflite",
        target="any",
        quant_format=None,
        activation_type=None,
        weight_type=None,
        reduce_range=False,
        per_channel=False,
        calibrate_method=None,
        calibration_samples=0,
        op_types=(),
        excluded_nodes=(),
        symbolic_shape_inference=False,
        ort_version="",
        onnx_version="",
    )
    return QuantizedModel(model, recipe, ())


# ------------------------------------------------------------------------ measuring, golden
def _preprocess(ds: Dataset, pre: Mapping[str, Any], dtypes: Mapping[str, str]) -> dict[str, Array]:
    return {
        name: pre[name].apply(np.asarray(x), dtypes.get(name, "float32"))
        for name, x in ds.inputs.items()
    }


def _run_all(
    runtime: Runtime, ds: Dataset, pre: Mapping[str, Any], batch: int = 64
) -> dict[str, Array]:
    dtypes = {i.name: i.dtype for i in runtime.inputs}
    feeds = _preprocess(ds, pre, dtypes)
    chunks: dict[str, list[Array]] = {}
    for start in range(0, len(ds), batch):
        out = runtime.run({k: v[start : start + batch] for k, v in feeds.items()})
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _perf(
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
        k: v[:64] for k, v in _preprocess(ds, pre, {i.name: i.dtype for i in f_rt.inputs}).items()
    }
    return {
        "float": measure_perf(f_rt, samples, f_size, max_seconds=1.0),
        "quantized": measure_perf(q_rt, samples, q_size, max_seconds=1.0),
    }


def _golden(
    runtime: Runtime, ds: Dataset, pre: Mapping[str, Any], outputs: OutputContract, count: int
) -> tuple[GoldenSample, ...]:
    """Golden samples the model answers confidently, so another CPU's rounding cannot flip them.

    For classification, samples whose top-two probability margin is at least 0.2 are preferred;
    expected outputs get ``atol`` 0.05 (int8 kernels differ slightly between CPU families).
    """
    if count <= 0:
        return ()
    pool = ds.take(min(len(ds), 256))
    results = _run_all(runtime, pool, pre)
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
def _compatibility(
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
    return Compatibility(
        runtime="onnxruntime", min_runtime_version=min_ort, arch=arch, opsets=opsets
    )


def _tool_versions() -> dict[str, str]:
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


def _report(
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
