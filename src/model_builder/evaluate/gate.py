"""The accuracy gate: the pure pass/fail decision and the rescue search.

Owns: the policy, :func:`judge` (pure: two measurements in, a verdict out), the rescue search
that keeps the most harmful nodes in float until the gate passes, and the quantize-then-gate
sequence the build runs. Does not own: how a model is quantized or measured; callers hand in
``quantize`` and ``measure`` callables (see ``measure.measure_onnx``, which runs the agent's own
onnxruntime adapter); ``evaluate``, ``measure_onnx`` and ``Metrics`` live in ``measure``.

Agreement: for classification, the share of samples whose top-1 class is the same for the float
and the quantized model; for regression, the share whose predictions differ by at most
``0.1 * std(y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model_builder.errors import AccuracyGateError, InputDataError
from model_builder.evaluate.measure import Metrics
from model_builder.quantize.calibration import ProgressFn
from model_builder.quantize.for_onnx import QuantizedModel

__all__ = [
    "GateOutcome",
    "GatePolicy",
    "GateVerdict",
    "RescueResult",
    "Trial",
    "judge",
    "quantize_with_gate",
    "rescue_search",
]

_EPS = 1e-9  # drops exactly at a threshold pass despite float rounding (0.97 - 0.96 > 0.01)
_REGRESSION_AGREEMENT_TOL = 0.1  # in units of std(y)


@dataclass(frozen=True)
class GatePolicy:
    """Fail above ``max_abs_drop`` (absolute, in metric units) or ``max_rel_drop`` (relative to
    the float metric); warn when top-1 agreement is below ``min_agreement``."""

    max_abs_drop: float = 0.01
    max_rel_drop: float = 0.01
    min_agreement: float = 0.99

    def __post_init__(self) -> None:
        for name in ("max_abs_drop", "max_rel_drop", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputDataError(f"gate policy {name} must lie in [0, 1]")


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision: ``reasons`` say why it failed, ``warnings`` what to look at."""

    passed: bool
    warnings: tuple[str, ...]
    reasons: tuple[str, ...]
    float_value: float
    quant_value: float
    abs_drop: float
    rel_drop: float
    agreement: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "warnings": list(self.warnings), "reasons": list(self.reasons)}


def judge(float_metrics: Metrics, quant_metrics: Metrics, policy: GatePolicy) -> GateVerdict:
    """Decide whether the quantized model kept enough accuracy. Pure.

    Fails when the metric dropped by more than ``policy.max_abs_drop`` (absolute) or by more
    than ``policy.max_rel_drop`` of the float value; a drop exactly at a threshold passes.
    Warns (without failing) when agreement with the float model is below ``min_agreement``.

    Raises:
        InputDataError: the two measurements are of different tasks or sample counts.
    """
    if float_metrics.task != quant_metrics.task or float_metrics.samples != quant_metrics.samples:
        raise InputDataError("float and quantized metrics were measured on different data")
    f, q = float_metrics.value, quant_metrics.value
    abs_drop = f - q
    rel_drop = abs_drop / f if f > 0 else (0.0 if abs_drop <= 0 else float("inf"))
    agreement = _agreement(float_metrics, quant_metrics)
    reasons, warnings = [], []
    metric = float_metrics.metric
    if abs_drop > policy.max_abs_drop + _EPS:
        reasons.append(
            f"{metric} dropped {abs_drop * 100:.2f} points ({f:.4f} -> {q:.4f}), "
            f"more than the allowed {policy.max_abs_drop * 100:.2f}"
        )
    if rel_drop > policy.max_rel_drop + _EPS:
        reasons.append(
            f"{metric} dropped {rel_drop:.2%} relative to float, more than the "
            f"allowed {policy.max_rel_drop:.2%}"
        )
    if agreement < policy.min_agreement - _EPS:
        warnings.append(
            f"top-1 agreement with the float model is {agreement:.2%}, below "
            f"{policy.min_agreement:.2%}: some answers changed"
        )
    verdict = (f, q, abs_drop, rel_drop, agreement)
    return GateVerdict(not reasons, tuple(warnings), tuple(reasons), *verdict)


@dataclass(frozen=True)
class Trial:
    """One rescue attempt: these nodes kept in float, and what the model then scored."""

    excluded: tuple[str, ...]
    value: float
    passed: bool


@dataclass(frozen=True)
class RescueResult:
    """The model that passed, the nodes kept in float, and every trial on the way."""

    excluded: tuple[str, ...]
    model: QuantizedModel
    metrics: Metrics
    verdict: GateVerdict
    single_trials: tuple[Trial, ...] = ()
    greedy_trials: tuple[Trial, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "excluded": list(self.excluded),
            "verdict": self.verdict.to_dict(),
            "single_trials": [asdict(t) for t in self.single_trials],
            "greedy_trials": [asdict(t) for t in self.greedy_trials],
        }


def rescue_search(
    quantize: Callable[[tuple[str, ...]], QuantizedModel],
    measure: Callable[[bytes], Metrics],
    float_metrics: Metrics,
    candidates: Sequence[str],
    policy: GatePolicy,
    *,
    max_exclusions: int = 8,
    progress: ProgressFn | None = None,
) -> RescueResult:
    """Find nodes to keep in float so that the quantized model passes the gate.

    First keeps each candidate in float on its own and measures the metric; then, in order of
    measured gain (ties keep graph order), adds exclusions one by one until the gate passes or
    ``max_exclusions`` nodes are excluded. Cost: one quantization and one evaluation per
    candidate plus at most ``max_exclusions - 1`` more.

    Args:
        quantize: quantizes the float model keeping the given node names in float.
        measure: scores model bytes with the same data and runtime as ``float_metrics``.
        float_metrics: the float model's score.
        candidates: quantizable node names (``QuantizedModel.quantizable_nodes``).
        policy: the gate policy.
        max_exclusions: most nodes to keep in float.
        progress: called as ``progress(done, total, label)`` after each trial.

    Returns:
        The first exclusion set that passes, its model, metrics, verdict and all trials.

    Raises:
        AccuracyGateError: no exclusion set within ``max_exclusions`` passes; ``report`` holds
            the float score and every trial.
    """
    total = len(candidates) + max(0, min(max_exclusions, len(candidates)) - 1)
    done = 0
    tried: dict[tuple[str, ...], tuple[QuantizedModel, Metrics, GateVerdict]] = {}

    def attempt(excluded: tuple[str, ...]) -> Trial:
        nonlocal done
        if excluded not in tried:
            model = quantize(excluded)
            metrics = measure(model.model_bytes)
            tried[excluded] = (model, metrics, judge(float_metrics, metrics, policy))
            done += 1
            if progress is not None:
                progress(done, total, f"rescue: float {', '.join(excluded)}")
        verdict = tried[excluded][2]
        return Trial(excluded, verdict.quant_value, verdict.passed)

    singles = tuple(attempt((name,)) for name in candidates)
    order = sorted(range(len(candidates)), key=lambda i: -singles[i].value)
    greedy: list[Trial] = []
    excluded: tuple[str, ...] = ()
    for i in order[:max_exclusions]:
        excluded = (*excluded, candidates[i])
        trial = attempt(excluded)
        greedy.append(trial)
        if trial.passed:
            model, metrics, verdict = tried[excluded]
            return RescueResult(excluded, model, metrics, verdict, singles, tuple(greedy))
    report = {
        "float": float_metrics.to_dict(),
        "policy": policy.__dict__,
        "max_exclusions": max_exclusions,
        "single_trials": [asdict(t) for t in singles],
        "greedy_trials": [asdict(t) for t in greedy],
    }
    best = max((*singles, *greedy), key=lambda t: t.value, default=None)
    detail = f"; best trial scored {best.value:.4f} keeping {list(best.excluded)}" if best else ""
    raise AccuracyGateError(
        f"no rescue within {max_exclusions} float nodes passes the gate (float "
        f"{float_metrics.metric} {float_metrics.value:.4f}{detail})",
        report,
    )


@dataclass(frozen=True)
class GateOutcome:
    """A quantized model that passed the gate, with the figures for the build report."""

    model: QuantizedModel
    float_metrics: Metrics
    quant_metrics: Metrics
    verdict: GateVerdict
    rescue: RescueResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "float": self.float_metrics.to_dict(),
            "quantized": self.quant_metrics.to_dict(),
            "verdict": self.verdict.to_dict(),
            "rescue": self.rescue.to_dict() if self.rescue is not None else None,
        }


def quantize_with_gate(
    float_model: bytes,
    quantize: Callable[[tuple[str, ...]], QuantizedModel],
    measure: Callable[[bytes], Metrics],
    policy: GatePolicy,
    *,
    max_exclusions: int = 8,
    progress: ProgressFn | None = None,
) -> GateOutcome:
    """Quantize, measure float and quantized, judge; on failure run :func:`rescue_search`.

    Raises:
        AccuracyGateError: the plain model failed and no rescue passed; ``report["initial"]``
            holds the plain model's verdict.
        QuantizationError, InputDataError, ModelLoadError, InferenceError: from the callables.
    """
    float_metrics = measure(float_model)
    plain = quantize(())
    plain_metrics = measure(plain.model_bytes)
    verdict = judge(float_metrics, plain_metrics, policy)
    if verdict.passed:
        return GateOutcome(plain, float_metrics, plain_metrics, verdict)
    candidates = [n.name for n in plain.quantizable_nodes]
    try:
        rescue = rescue_search(
            quantize,
            measure,
            float_metrics,
            candidates,
            policy,
            max_exclusions=max_exclusions,
            progress=progress,
        )
    except AccuracyGateError as exc:
        exc.report["initial"] = verdict.to_dict()
        raise
    return GateOutcome(rescue.model, float_metrics, rescue.metrics, rescue.verdict, rescue)


def _agreement(a: Metrics, b: Metrics) -> float:
    if a.task == "classification":
        return float(np.mean(a.predictions == b.predictions))
    tol = _REGRESSION_AGREEMENT_TOL * (a.target_std or 1.0)
    close = np.abs(a.predictions - b.predictions).max(axis=1) <= tol
    return float(np.mean(close))
