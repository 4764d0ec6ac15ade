"""``model-builder build``: float model in, signed bundle and report out.

Owns the order of the steps and nothing else: quantize (``quantize_onnx`` / ``quantize_tflite``),
gate with the agent's own runtime adapters (``gate``), measure (``perf``), compare with the
champion bundle when given one (``evaluate.compare``), compute the drift baseline with the
device's code (``edge_agent.drift``), choose golden samples, fill in the manifest, and sign
(``package``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy.typing as npt

from edge_agent.contract import (
    BundleManifest,
    InputContract,
    OutputContract,
    Provenance,
)
from edge_agent.drift import build_baseline
from edge_agent.runtime.base import RuntimeOptions
from edge_agent.runtime.loader import load_runtime
from model_builder.build_parts import (
    build_report,
    compatibility,
    golden_samples,
    measure_both,
    run_all,
    tool_versions,
)
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.errors import AccuracyGateError, ChampionRegressionError, InputDataError
from model_builder.evaluate.compare import (
    Champion,
    ChampionComparison,
    check_champion_fits,
    compare_with_champion,
    comparison_report,
)
from model_builder.evaluate.contract_check import check_contract_fits_model, refusals
from model_builder.evaluate.failure import failure_report
from model_builder.evaluate.gate import GateOutcome, judge, quantize_with_gate
from model_builder.evaluate.measure import Metrics, evaluate, measure_onnx
from model_builder.evaluate.report import render_table
from model_builder.keystore import KeyStore
from model_builder.package import artifact_ref, package_bundle
from model_builder.quantize.calibration import CalibrationSource, ProgressFn, calibration_stats
from model_builder.quantize.for_onnx import QuantizedModel, default_target, quantize_onnx

Array = npt.NDArray[Any]

TFLITE_RECIPES = {
    "static": "static_wi8_ai8",
    "dynamic": "dynamic_wi8_afp32",
    "auto": "static_wi8_ai8",
}


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
    champion: Champion | None = None,
) -> BuildResult:
    """Quantize, gate, baseline, package and sign one model.

    With a ``champion`` (a verified bundle of the same name, ``compare.load_champion``) the
    quantized model is also compared with it on the evaluation set (``config.compare_limits``)
    and the comparison goes into the report, so it is signed with the manifest.

    Raises:
        InputDataError: the evaluation data has no labels, or does not fit the model.
        ContractMismatchError: the contract names inputs, outputs, shapes or dtypes the model
            does not have.
        ModelCheckError, QuantizationError: the model or the quantizer failed.
        AccuracyGateError: the quantized model failed the gate and no rescue passed; its
            ``report`` is the full failure report (``failure.failure_report``) with diagnosis.
        ChampionMismatchError: the champion's labels, task or inputs differ from the contract's
            (checked before quantizing).
        ChampionRegressionError: the quantized model is worse than the champion beyond
            ``config.compare_limits`` and ``config.allow_regression`` is None; its ``report``
            is the full report with the comparison; nothing is signed.
        KeyStoreError: no usable signing key.
    """
    inputs, outputs = contract
    if evaluation.labels is None:
        raise InputDataError("evaluation data needs labels (y) for the accuracy gate")
    if fmt not in ("onnx", "tflite"):
        raise InputDataError(f"unsupported model format {fmt!r}")
    pre = {t.name: t.preprocessing for t in inputs.tensors}
    started = time.perf_counter()
    f_runtime = load_runtime(model_bytes, fmt, RuntimeOptions(warmup_runs=1))
    try:
        check_contract_fits_model(inputs, outputs, f_runtime.inputs, f_runtime.outputs)
        if champion is not None:
            check_champion_fits(champion.manifest, inputs, outputs)
        contract_check = {
            "source": config.contract_source,
            **refusals(inputs, evaluation.inputs).to_dict(),
        }
        target = config.target or default_target()
        try:
            if fmt == "onnx":
                outcome, quantized, recipe, cal_stats = _quantize_onnx(
                    model_bytes, calib, evaluation, inputs, outputs, config, target, progress
                )
            else:
                outcome, quantized, recipe, cal_stats = _quantize_tflite(
                    model_bytes, calib, evaluation, inputs, outputs, config, progress
                )
        except AccuracyGateError as exc:
            exc.report = failure_report(
                exc.report,
                mode=config.mode,
                target=target,
                fmt=fmt,
                policy=config.policy.__dict__,
                contract_check=contract_check,
                seconds=time.perf_counter() - started,
            )
            raise
        build_seconds = time.perf_counter() - started
        q_runtime = load_runtime(quantized, fmt, RuntimeOptions(warmup_runs=1))
        try:
            perf = measure_both(
                f_runtime,
                q_runtime,
                evaluation,
                pre,
                len(model_bytes),
                len(quantized),
                config.measure_latency,
            )
            baseline_outputs = run_all(q_runtime, calib, pre)
            golden = golden_samples(q_runtime, evaluation, pre, outputs, config.golden)
            compared: ChampionComparison | None = None
            if champion is not None:
                compared = compare_with_champion(
                    champion,
                    q_runtime,
                    inputs,
                    outputs,
                    evaluation,
                    config.compare_limits,
                    progress=progress,
                )
        finally:
            q_runtime.close()
    finally:
        f_runtime.close()

    baseline = build_baseline(
        calib.inputs, baseline_outputs, n_bins=config.n_bins, kll_k=config.kll_k
    )
    report = build_report(
        outcome,
        recipe,
        cal_stats,
        perf,
        build_seconds,
        target,
        config,
        (len(model_bytes), len(quantized)),
    )
    report["contract_check"] = contract_check
    if champion is not None and compared is not None:
        report["comparison"] = comparison_report(champion, compared, config.allow_regression)
    report["table"] = render_table(report)
    if compared is not None and compared.verdict.regressed and config.allow_regression is None:
        assert champion is not None
        raise ChampionRegressionError(
            f"worse than {champion.manifest.name} v{champion.manifest.version} (--compare-to): "
            + "; ".join(compared.verdict.reasons)
            + "; give --allow-regression REASON to sign it anyway",
            report,
        )
    manifest = BundleManifest(
        name=config.name,
        version=config.version,
        channel=config.channel,
        artifact=artifact_ref(quantized, fmt),
        inputs=inputs,
        outputs=outputs,
        baseline=baseline,
        golden=golden,
        compatibility=compatibility(fmt, quantized, recipe, target, config),
        provenance=Provenance(
            source_sha256=hashlib.sha256(model_bytes).hexdigest(),
            source_format=fmt,
            recipe=recipe,
            tool_versions=tool_versions(),
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
        try:
            outcome = quantize_with_gate(
                model_bytes,
                quantize,
                measure,
                config.policy,
                max_exclusions=config.max_exclusions,
                progress=progress,
            )
        except AccuracyGateError as exc:
            exc.report.setdefault("calibration", calibration_stats(source))
            raise
    else:
        plain = quantize(())
        float_m, quant_m = measure(model_bytes), measure(plain.model_bytes)
        verdict = judge(float_m, quant_m, config.policy)
        if not verdict.passed:
            raise AccuracyGateError(
                "quantized model failed the accuracy gate: " + "; ".join(verdict.reasons),
                {
                    "initial": verdict.to_dict(),
                    "float": float_m.to_dict(),
                    "calibration": dict(plain.calibration_stats),
                },
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
    from model_builder.quantize.for_tflite import quantize_tflite

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
            {"initial": verdict.to_dict(), "float": metrics[0].to_dict(), "calibration": stats},
        )
    outcome = GateOutcome(_tflite_as_quantized(result.model), metrics[0], metrics[1], verdict)
    return outcome, result.model, {"mode": config.mode, **result.report.to_dict()}, stats


def _tflite_as_quantized(model: bytes) -> QuantizedModel:
    """GateOutcome carries a QuantizedModel; TFLite has no recipe record of that shape."""
    from model_builder.quantize.for_onnx import QuantRecipe

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
