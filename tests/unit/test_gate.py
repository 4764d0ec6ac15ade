"""The accuracy gate: pure verdicts, measurement with the agent's runtime, and the rescue search."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.contract.inputs import OutputContract, Preprocessing
from edge_agent.runtime.onnx import OnnxRuntime
from model_builder.errors import AccuracyGateError, InputDataError
from model_builder.evaluate.gate import GatePolicy, judge, quantize_with_gate, rescue_search
from model_builder.evaluate.measure import Metrics, evaluate, measure_onnx
from model_builder.quantize.calibration import CalibrationSource
from model_builder.quantize.for_onnx import QuantizedModel, QuantRecipe, quantize_onnx

N = 1000


def _metrics(value: float, changed: int = 0) -> Metrics:
    """Accuracy ``value`` on N samples; ``changed`` top-1 answers differ from all-zero."""
    pred = np.zeros(N, dtype=np.int64)
    pred[:changed] = 1
    return Metrics("classification", "accuracy", value, N, pred)


@pytest.mark.parametrize(
    ("policy", "f", "q", "changed", "passed", "n_reasons", "warned"),
    [
        (GatePolicy(), 0.97, 0.97, 0, True, 0, False),
        (GatePolicy(), 0.97, 0.98, 0, True, 0, False),  # improved
        (GatePolicy(), 1.00, 0.99, 0, True, 0, False),  # exactly 1 point and 1%: boundary passes
        (GatePolicy(), 1.00, 0.989, 0, False, 2, False),  # just over both
        (GatePolicy(), 0.50, 0.495, 0, True, 0, False),  # 0.5 point, exactly 1% relative
        (GatePolicy(), 0.50, 0.494, 0, False, 1, False),  # 0.6 point but 1.2% relative
        (GatePolicy(max_rel_drop=1.0), 0.90, 0.889, 0, False, 1, False),  # absolute only
        (GatePolicy(max_rel_drop=1.0), 0.90, 0.89, 0, True, 0, False),  # absolute boundary
        (GatePolicy(), 0.97, 0.97, 10, True, 0, False),  # agreement exactly 99%
        (GatePolicy(), 0.97, 0.97, 11, True, 0, True),  # agreement 98.9%: warn, not fail
        (GatePolicy(), 0.97, 0.90, 200, False, 2, True),  # fail and warn together
        (GatePolicy(min_agreement=0.0), 0.97, 0.97, N, True, 0, False),
    ],
)
def test_judge(policy, f, q, changed, passed, n_reasons, warned):
    verdict = judge(_metrics(f), _metrics(q, changed), policy)
    assert verdict.passed is passed
    assert len(verdict.reasons) == n_reasons
    assert bool(verdict.warnings) is warned
    assert verdict.agreement == pytest.approx(1 - changed / N)
    assert verdict.abs_drop == pytest.approx(f - q)


def test_judge_reasons_name_the_drop():
    verdict = judge(_metrics(0.97), _metrics(0.90), GatePolicy())
    assert "7.00 points" in verdict.reasons[0]
    assert verdict.to_dict()["passed"] is False


def test_judge_refuses_metrics_from_different_data():
    other = Metrics("classification", "accuracy", 0.9, 10, np.zeros(10))
    with pytest.raises(InputDataError):
        judge(_metrics(0.9), other, GatePolicy())


@pytest.mark.parametrize(
    "kw", [{"max_abs_drop": -0.1}, {"max_rel_drop": 2.0}, {"min_agreement": 1.5}]
)
def test_policy_bounds(kw):
    with pytest.raises(InputDataError):
        GatePolicy(**kw)


def test_evaluate_with_the_agent_runtime(digits_mlp):
    ex = digits_mlp
    calls = []
    metrics = evaluate(
        OnnxRuntime(ex.model_bytes),
        ex.x_eval,
        ex.y_eval,
        ex.preprocessing,
        ex.output_contract(),
        progress=lambda d, t, label: calls.append((d, t, label)),
    )
    assert metrics.value == pytest.approx(ex.reference_accuracy)
    assert metrics.samples == 450
    assert metrics.metric == "accuracy"
    assert calls[-1] == (8, 8, "evaluation")
    as_labels = ex.y_eval.astype(str)  # labels named in the contract work too
    again = measure_onnx(
        ex.model_bytes, ex.x_eval, as_labels, ex.preprocessing, ex.output_contract()
    )
    assert again.value == metrics.value


def test_evaluate_refuses_unusable_data(digits_mlp):
    ex, rt = digits_mlp, OnnxRuntime(digits_mlp.model_bytes)
    with pytest.raises(InputDataError, match="equally many"):
        evaluate(rt, ex.x_eval, ex.y_eval[:10], ex.preprocessing, ex.output_contract())
    raw = OutputContract("raw", ("probabilities",))
    with pytest.raises(InputDataError, match="raw"):
        evaluate(rt, ex.x_eval, ex.y_eval, ex.preprocessing, raw)
    with pytest.raises(InputDataError, match="not in the contract"):
        evaluate(rt, ex.x_eval, np.full(450, "cat"), ex.preprocessing, ex.output_contract())
    with pytest.raises(InputDataError, match="inputs"):
        evaluate(rt, {"other": ex.x_eval}, ex.y_eval, ex.preprocessing, ex.output_contract())


def _linear_regression_model(w: np.ndarray) -> bytes:
    node = helper.make_node("MatMul", ["x", "w"], ["value"], "mm")
    graph = helper.make_graph(
        [node],
        "reg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["n", 1])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_regression_uses_the_rmse_score():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    w = np.array([[1.0], [2.0], [-1.0]])
    y = (x @ w).ravel()
    contract = OutputContract("regression", ("value",))
    exact = measure_onnx(_linear_regression_model(w), x, y, Preprocessing(), contract)
    assert exact.metric == "rmse_score"
    assert exact.value == pytest.approx(1.0, abs=1e-6)
    off = measure_onnx(_linear_regression_model(w * 1.1), x, y, Preprocessing(), contract)
    rmse = np.sqrt(np.mean((x @ (w * 0.1)) ** 2))  # the predictions are off by x @ (0.1 w)
    assert off.value == pytest.approx(1 - rmse / y.std(), rel=1e-4)
    assert off.value < exact.value
    verdict = judge(exact, off, GatePolicy())
    assert not verdict.passed
    assert verdict.agreement < 1.0


def _static(ex):
    calib = CalibrationSource.single(ex.input_name, ex.x_calib, ex.preprocessing)
    return lambda excluded: quantize_onnx(ex.model_bytes, calib, "static", "x86", excluded)


def _measure(ex):
    contract = ex.output_contract()
    return lambda model: measure_onnx(model, ex.x_eval, ex.y_eval, ex.preprocessing, contract)


def test_outlier_model_fails_plain_gate_and_is_rescued(digits_outlier_mlp):
    ex = digits_outlier_mlp
    quantize, measure = _static(ex), _measure(ex)
    float_metrics = measure(ex.model_bytes)
    plain = quantize(())
    plain_verdict = judge(float_metrics, measure(plain.model_bytes), GatePolicy())
    assert not plain_verdict.passed
    assert plain_verdict.quant_value < 0.5

    candidates = [n.name for n in plain.quantizable_nodes]
    rescue = rescue_search(quantize, measure, float_metrics, candidates, GatePolicy())
    assert rescue.verdict.passed
    assert rescue.verdict.quant_value >= float_metrics.value - 0.01
    assert len(rescue.excluded) == 1
    kinds = {n.name: n.op_type for n in plain.quantizable_nodes}
    assert kinds[rescue.excluded[0]] == "Gemm"
    # The node kept in float is the layer that reads the outlier tensor.
    pre = onnx.load_from_string(rescue.model.model_bytes)
    reader = next(n for n in pre.graph.node if n.name == rescue.excluded[0])
    assert reader.input[0] == "outlier.out"
    assert [t.excluded for t in rescue.single_trials] == [(c,) for c in candidates]
    assert rescue.model.recipe.excluded_nodes == rescue.excluded


def test_quantize_with_gate_passes_good_models_without_rescue(digits_mlp):
    outcome = quantize_with_gate(
        digits_mlp.model_bytes, _static(digits_mlp), _measure(digits_mlp), GatePolicy()
    )
    assert outcome.verdict.passed
    assert outcome.rescue is None
    assert outcome.to_dict()["rescue"] is None


def test_hopeless_case_raises_with_the_full_report(digits_outlier_mlp):
    ex = digits_outlier_mlp
    quantize, measure = _static(ex), _measure(ex)
    float_metrics = measure(ex.model_bytes)
    # Without the culprit among the candidates nothing can pass.
    innocent = ["fc1/MatMulAddFusion", "relu1"]
    with pytest.raises(AccuracyGateError) as info:
        rescue_search(quantize, measure, float_metrics, innocent, GatePolicy())
    report = info.value.report
    assert [t["excluded"] for t in report["single_trials"]] == [(c,) for c in innocent]
    assert len(report["greedy_trials"]) == 2
    assert report["float"]["value"] == pytest.approx(float_metrics.value)
    with pytest.raises(AccuracyGateError) as info:
        quantize_with_gate(ex.model_bytes, quantize, measure, GatePolicy(), max_exclusions=0)
    assert info.value.report["initial"]["passed"] is False


def _fake_model(excluded: tuple[str, ...]) -> QuantizedModel:
    recipe = QuantRecipe(
        "static",
        "static",
        "x86",
        "QDQ",
        "QUInt8",
        "QInt8",
        True,
        True,
        "MinMax",
        1,
        (),
        excluded,
        False,
        "x",
        "y",
    )
    return QuantizedModel(",".join(sorted(excluded)).encode(), recipe, ())


def test_rescue_orders_by_single_gain_and_adds_greedily():
    """b helps most alone, c next; only b and c together pass; a never matters."""
    score = {"": 0.5, "a": 0.5, "b": 0.8, "c": 0.7, "b,c": 0.97, "a,b,c": 0.97}

    def measure(model: bytes) -> Metrics:
        return _metrics(score.get(model.decode(), 0.6))

    calls = []
    result = rescue_search(
        _fake_model,
        measure,
        _metrics(0.97),
        ["a", "b", "c"],
        GatePolicy(),
        progress=lambda d, t, label: calls.append(label),
    )
    assert result.excluded == ("b", "c")
    assert [t.excluded for t in result.greedy_trials] == [("b",), ("b", "c")]
    assert len(calls) == 4  # three single trials; ("b",) is reused, then ("b", "c")
    with pytest.raises(AccuracyGateError):
        rescue_search(
            _fake_model, measure, _metrics(0.97), ["a", "b", "c"], GatePolicy(), max_exclusions=1
        )


# ------------------------------------------------------------ the report of a failed build
_INITIAL = {
    "float_value": 0.97,
    "quant_value": 0.10,
    "abs_drop": 0.87,
    "rel_drop": 0.9,
    "agreement": 0.1,
    "passed": False,
    "warnings": [],
    "reasons": ["accuracy dropped 87.00 points"],
}
_NORMAL = {"min": -3.0, "max": 3.0, "mean": 0.0, "std": 1.0, "p99_abs": 2.5}


@pytest.mark.parametrize(
    ("gate", "fmt", "check", "expect"),
    [
        # plain failure, --no-rescue: outliers and the advice to let the rescue run
        (
            {"initial": _INITIAL, "calibration": {"x": {**_NORMAL, "looks_unnormalised": False}}},
            "onnx",
            None,
            ["outliers", "--no-rescue"],
        ),
        # un-normalised calibration input comes first
        (
            {
                "initial": {**_INITIAL, "quant_value": 0.96, "abs_drop": 0.011},
                "calibration": {"x": {**_NORMAL, "p99_abs": 255.0, "looks_unnormalised": True}},
            },
            "onnx",
            None,
            ["un-normalised", "--no-rescue"],
        ),
        # rescue ran and gave up: its best trial and --max-exclusions
        (
            {
                "initial": _INITIAL,
                "float": {"metric": "accuracy", "value": 0.97, "samples": 450},
                "max_exclusions": 1,
                "single_trials": [
                    {"excluded": ["a"], "value": 0.5, "passed": False},
                    {"excluded": ["b"], "value": 0.9, "passed": False},
                ],
                "greedy_trials": [{"excluded": ["b"], "value": 0.9, "passed": False}],
                "calibration": {},
            },
            "onnx",
            None,
            ["outliers", "rescue search tried 3", "[b]", "--max-exclusions"],
        ),
        ({"initial": _INITIAL, "calibration": {}}, "tflite", None, ["--mode dynamic"]),
        (
            {"initial": {**_INITIAL, "quant_value": 0.955}, "calibration": {}},
            "tflite",
            {"rows": 100, "refused_rows": 4},
            ["--mode dynamic", "refuses 4 of 100"],
        ),
    ],
)
def test_failure_report_and_diagnosis(gate, fmt, check, expect):
    from model_builder.evaluate.failure import failure_report, render_failure

    report = failure_report(
        gate,
        mode="static",
        target="x86",
        fmt=fmt,
        policy=GatePolicy().__dict__,
        contract_check=check,
        seconds=1.23456,
    )
    assert report["gate"]["passed"] is False
    assert report["gate"]["reasons"] == _INITIAL["reasons"]
    assert report["float"]["value"] == 0.97
    assert report["calibration"] == gate["calibration"]
    text = " | ".join(report["diagnosis"])
    position = -1
    for fragment in expect:  # in this order: the most specific cause first
        found = text.find(fragment, position + 1)
        assert found > position, (fragment, text)
        position = found
    assert (report["rescue"] is None) == ("single_trials" not in gate)
    if report["rescue"]:
        assert report["rescue"]["best"]["excluded"] == ["b"]
    lines = render_failure(report)
    assert lines.startswith("gate: FAILED (static x86)")
    assert lines.count("diagnosis: ") == len(report["diagnosis"])
