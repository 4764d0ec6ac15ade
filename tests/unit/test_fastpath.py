"""Every fast path of the inference hot path against the slow path it replaces, table-driven.

Covers: compiled preprocessing (pre-tiled, scalar, skipped multiply/add) against the plain
``flat * scale + offset``; the one-reduction ``[0, hi]`` range check against the exact per-row
check; the remembered binary-request headers against ``decode_request``; the plain-number API
metrics against prometheus-client's own classes; the batch-1 drift row copy against the
batch path; the compiled onnxruntime ``run`` against the public one.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bundles import DigitsBundles
from edge_agent.api.decode import decode_request
from edge_agent.api.header_cache import RequestDecoder
from edge_agent.api.metrics import LATENCY_BUCKETS, ApiMetrics
from edge_agent.bundle import read_bundle
from edge_agent.config import DriftConfig, ModelPolicy
from edge_agent.contract import DimSpec, FeatureRanges, InputContract, TensorSpec
from edge_agent.contract.inputs import Preprocessing
from edge_agent.contract.validation import Validator
from edge_agent.errors import ContractError, InferenceError, InputValidationError
from edge_agent.runtime.loader import load_runtime
from edge_agent.serving.pipeline import BLOCK, ModelPipeline

# --- preprocessing -------------------------------------------------------------------------

RNG = np.random.default_rng(7)
PREPROCESSING = [
    ("scalar scale", Preprocessing("affine", (1 / 16,), (0.0,))),
    ("scalar both", Preprocessing("affine", (0.5,), (1.0,))),
    ("unit scale", Preprocessing("affine", (1.0,), (2.0,))),
    ("unit scale zero offset", Preprocessing("affine", (1.0,), (0.0,))),
    ("per feature", Preprocessing.standardize(RNG.random(12), RNG.random(12) + 0.1)),
    ("scalar scale, per-feature offset", Preprocessing("affine", (2.0,), tuple(RNG.random(12)))),
    ("per-feature scale, zero offset", Preprocessing("affine", tuple(RNG.random(12)), (0.0,))),
    ("identity", Preprocessing()),
]
DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int32", "int64", "bool"]
SHAPES = [(1, 12), (3, 12), (5, 3, 4), (3000, 12), (1, 2, 2, 3), (4,)]


def reference_preprocess(pre: Preprocessing, x: np.ndarray, target: str) -> np.ndarray:
    """What ``compile`` computed before the fast paths: always flatten, multiply, add."""
    if pre.kind == "identity":
        return x if x.dtype == np.dtype(target) else x.astype(target)
    flat = x.reshape(x.shape[0], -1)
    scale = np.asarray(pre.scale, dtype=np.float32)
    offset = np.asarray(pre.offset, dtype=np.float32)
    if {scale.size, offset.size} - {1} - {flat.shape[1]}:
        raise ContractError("feature count")
    out = flat * scale
    out += offset
    out = out.reshape(x.shape)
    return out if out.dtype == np.dtype(target) else out.astype(target)


@pytest.mark.parametrize(("case", "pre"), PREPROCESSING, ids=[c[0] for c in PREPROCESSING])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["float32", "float64"])
def test_compiled_preprocessing_equals_the_plain_computation(
    case: str, pre: Preprocessing, dtype: str, target: str
) -> None:
    run = pre.compile(target)
    for shape in SHAPES:
        x = (RNG.standard_normal(shape) * 20).astype(dtype)
        try:
            expected = reference_preprocess(pre, x, target)
        except (ContractError, ValueError):
            with pytest.raises(ContractError):
                run(x)
            continue
        got = run(x)
        assert got.dtype == expected.dtype, (shape, got.dtype, expected.dtype)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)  # bit for bit (up to the sign of 0)


def test_compiled_preprocessing_propagates_nan_and_refuses_wrong_feature_counts() -> None:
    run = PREPROCESSING[4][1].compile()
    x = np.ones((2, 12), np.float32)
    x[1, 3] = np.nan
    assert np.isnan(run(x)[1, 3])
    assert np.isfinite(np.delete(run(x), 3, axis=1)).all()
    with pytest.raises(ContractError, match="12 values for 5 features"):
        run(np.ones((2, 5), np.float32))


def test_compiled_preprocessing_does_not_touch_its_input() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    before = x.copy()
    for _, pre in PREPROCESSING[:-1]:
        out = pre.compile()(x)
        assert out is not x
    np.testing.assert_array_equal(x, before)


# --- the one-reduction range check ---------------------------------------------------------


def special_values(dtype: Any, hi: float) -> list[float]:
    d = np.dtype(dtype)
    h = np.array(hi, dtype=d) if np.isfinite(np.array(hi, dtype=d)) else np.finfo(d).max
    return [
        0.0,
        -0.0,
        float(np.finfo(d).smallest_subnormal),
        -float(np.finfo(d).smallest_subnormal),
        float(h),
        float(np.nextafter(h, np.array(np.inf, dtype=d))),
        float(np.nextafter(h, np.array(-np.inf, dtype=d))),
        hi,
        float("nan"),
        float("inf"),
        float("-inf"),
        -1.0,
        1.0,
    ]


def exact_counts(x: np.ndarray, lo: float, hi: float) -> dict[str, int]:
    """The row problems of ``x`` computed directly, in float64, row by row."""
    counts = {"nan": 0, "inf": 0, "out_of_range": 0}
    for row in x.reshape(x.shape[0], -1).astype(np.float64):
        nan, inf = bool(np.isnan(row).any()), bool(np.isinf(row).any())
        finite = row[np.isfinite(row)]
        out = bool(((finite < lo) | (finite > hi)).any())
        counts["nan"] += nan
        counts["inf"] += inf
        counts["out_of_range"] += out
    return {k: v for k, v in counts.items() if v}


def range_validator(dtype: str, lo: float, hi: float, policy: str) -> Validator:
    spec = TensorSpec(
        "x", dtype, (DimSpec(min=1, max=64), DimSpec(size=2)), FeatureRanges((lo,), (hi,))
    )
    return Validator(InputContract((spec,)), policy)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("hi", [16.0, 0.1, 1e10, float("inf"), 0.0])
@pytest.mark.parametrize("policy", ["reject", "drop"])
def test_range_fast_check_agrees_with_the_exact_check(dtype: str, hi: float, policy: str) -> None:
    validator = range_validator(dtype, 0.0, hi, policy)
    with np.errstate(over="ignore"):
        values = special_values(dtype, hi)
        rows = [[a, b] for a in values for b in (0.0, values[4])]
        batches = [np.array(rows[i : i + 1], dtype=dtype) for i in range(len(rows))]
        batches.append(np.array(rows[:60], dtype=dtype))
    for x in batches:
        expected = exact_counts(x, 0.0, hi)
        if not expected:
            result = validator.validate({"x": x})
            assert result.rows_kept == x.shape[0], x
            continue
        bad_rows = sum(
            1
            for row in x.astype(np.float64)
            if np.isnan(row).any() or np.isinf(row).any() or ((row < 0.0) | (row > hi)).any()
        )
        if policy == "reject" or bad_rows == x.shape[0]:
            with pytest.raises(InputValidationError) as info:
                validator.validate({"x": x})
            assert info.value.counts == expected, x
            assert info.value.field == "x"
        else:
            result = validator.validate({"x": x})
            assert dict(result.rejected) == expected
            assert result.rows_kept == x.shape[0] - bad_rows


def test_fast_range_check_is_used_only_where_it_is_exact() -> None:
    compiled = range_validator("float32", 0.0, 0.1, "reject")._tensors[0]
    assert compiled.bits is not None
    # float32(0.1) is above 0.1: the largest allowed pattern is the float below it.
    assert compiled.bits[1] == int(np.nextafter(np.float32(0.1), np.float32(0)).view(np.uint32))
    assert range_validator("float32", -1.0, 1.0, "reject")._tensors[0].bits is None
    assert range_validator("float32", 0.5, 1.0, "reject")._tensors[0].bits is None
    with pytest.raises(InputValidationError):
        range_validator("float32", 0.0, 0.1, "reject").validate(
            {"x": np.full((1, 2), 0.1, np.float32)}
        )


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 200.0), (-5.0, 100.0), (3.0, 7.0)])
def test_unsigned_inputs_check_only_what_can_fail(lo: float, hi: float) -> None:
    validator = range_validator("uint8", lo, hi, "drop")
    x = np.array([[0, 1], [2, 7], [8, 100], [101, 255], [3, 200]], dtype=np.uint8)
    expected = exact_counts(x, lo, hi)
    bad = sum(1 for row in x if exact_counts(row[None, :], lo, hi))
    if bad == len(x):
        with pytest.raises(InputValidationError):
            validator.validate({"x": x})
    else:
        result = validator.validate({"x": x})
        assert dict(result.rejected) == expected
        assert result.rows_kept == len(x) - bad
    for row in x:
        one = row[None, :]
        if exact_counts(one, lo, hi):
            with pytest.raises(InputValidationError):
                validator.validate({"x": one})
        else:
            assert validator.validate({"x": one}).rows_kept == 1


# --- remembered binary headers -------------------------------------------------------------


def binary_body(
    inputs: list[dict[str, Any]], blobs: list[bytes], **extra: Any
) -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + b"".join(blobs), str(len(header))


def tensor(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


X = np.arange(6, dtype="<f4")
BODIES = [
    ("one FP32", *binary_body([tensor("x", "FP32", [2, 3], 24)], [X.tobytes()])),
    (
        "two inputs and parameters",
        *binary_body(
            [tensor("a", "INT64", [1, 2], 16), tensor("b", "BOOL", [3], 3)],
            [np.array([[5, -6]], "<i8").tobytes(), bytes([0, 1, 1])],
            parameters={"binary_data_output": True, "routing_key": "k"},
            outputs=[{"name": "y", "parameters": {"binary_data": False}}],
        ),
    ),
    ("bad BOOL bytes", *binary_body([tensor("b", "BOOL", [2], 2)], [bytes([0, 2])])),
    ("short", *binary_body([tensor("x", "FP32", [2, 3], 24)], [X.tobytes()[:20]])),
    ("trailing", *binary_body([tensor("x", "FP32", [1, 2], 8)], [X.tobytes()[:12]])),
    ("wrong size", *binary_body([tensor("x", "FP32", [2, 3], 20)], [X.tobytes()[:20]])),
    ("with id", *binary_body([tensor("x", "FP32", [2, 3], 24)], [X.tobytes()], id="r1")),
    (
        "json and binary",
        *binary_body(
            [
                {"name": "j", "datatype": "INT32", "shape": [2], "data": [1, 2]},
                tensor("x", "FP32", [2, 3], 24),
            ],
            [X.tobytes()],
        ),
    ),
    (
        "BYTES",
        *binary_body([tensor("s", "BYTES", [2], 11)], [b"\x03\x00\x00\x00abc\x00\x00\x00\x00"]),
    ),
]


def outcome(decode: Any, raw: bytes, header: str) -> Any:
    try:
        d = decode(raw, header)
    except InputValidationError as exc:
        return ("error", exc.reason, exc.field, str(exc))
    return (
        {
            k: (v.dtype.str, v.shape, v.tobytes() if v.dtype.kind != "O" else v.tolist())
            for k, v in d.inputs.items()
        },
        d.request_id,
        d.parameters,
        d.outputs,
        d.binary_output,
    )


@pytest.mark.parametrize(("case", "raw", "header"), BODIES, ids=[b[0] for b in BODIES])
def test_remembered_headers_decode_exactly_as_decode_request(
    case: str, raw: bytes, header: str
) -> None:
    decoder = RequestDecoder()
    expected = outcome(decode_request, raw, header)
    for _ in range(3):  # the first call parses, the next ones replay
        assert outcome(decoder.decode, raw, header) == expected


def test_a_remembered_header_still_checks_the_bytes_that_follow() -> None:
    decoder = RequestDecoder()
    raw, header = binary_body([tensor("b", "BOOL", [2], 2)], [bytes([0, 1])])
    assert decoder.decode(raw, header).inputs["b"].tolist() == [False, True]
    n = int(header)
    for tail, reason in (
        (bytes([0, 7]), "data"),
        (bytes([1]), "binary_size"),
        (b"\0" * 3, "binary_size"),
    ):
        with pytest.raises(InputValidationError) as info:
            decoder.decode(raw[:n] + tail, header)
        assert info.value.reason == reason
        assert outcome(decoder.decode, raw[:n] + tail, header) == outcome(
            decode_request, raw[:n] + tail, header
        )


def test_remembered_headers_are_bounded_and_hand_out_fresh_parameters() -> None:
    decoder = RequestDecoder(max_entries=4)
    for i in range(10):
        raw, header = binary_body(
            [tensor("x", "FP32", [1, 1], 4)], [X.tobytes()[:4]], parameters={"n": i}
        )
        decoder.decode(raw, header)
    assert len(decoder._plans) == 4
    raw, header = binary_body(
        [tensor("x", "FP32", [1, 1], 4)], [X.tobytes()[:4]], parameters={"n": 9}
    )
    first = decoder.decode(raw, header)
    first.parameters["n"] = "changed"
    assert decoder.decode(raw, header).parameters == {"n": 9}
    with_id, id_header = BODIES[6][1], BODIES[6][2]
    decoder.decode(with_id, id_header)
    assert with_id[: int(id_header)] not in decoder._plans  # an id makes every header unique


# --- API metrics -----------------------------------------------------------------------------


def reference_metrics() -> tuple[CollectorRegistry, Any]:
    """The same families built from prometheus-client's classes, as ApiMetrics used to."""
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "edgefleet_api_requests",
        "Local API requests by endpoint, model, outcome and reason.",
        ("endpoint", "model", "outcome", "reason"),
        registry=registry,
    )
    latency = Histogram(
        "edgefleet_api_request_duration_seconds",
        "Inference request latency, from first byte read to response built.",
        ("model", "outcome"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    in_flight = Gauge(
        "edgefleet_api_in_flight_requests", "Inference requests being served.", registry=registry
    )
    source = Counter(
        "edgefleet_inference_source",
        "Answered inference requests by where they ran (device or cloud).",
        ("model", "source"),
        registry=registry,
    )
    Gauge(
        "edgefleet_model_version_info",
        "1 for the model version serving now.",
        ("model", "version"),
        registry=registry,
    )
    Counter(
        "edgefleet_validation_rows_rejected",
        "Input rows rejected or dropped by validation, by reason.",
        ("model", "reason"),
        registry=registry,
    )
    return registry, (requests, latency, in_flight, source)


def without_created(text: bytes) -> str:
    return "\n".join(line for line in text.decode().splitlines() if "_created" not in line)


def test_api_metrics_export_what_prometheus_client_classes_would() -> None:
    metrics = ApiMetrics()
    registry, (requests, latency, in_flight, source) = reference_metrics()
    observations = [
        ("digits", "ok", "none", 0.0005),  # exactly on a bound: that bucket
        ("digits", "ok", "none", 0.0007),
        ("digits", "ok", "none", 7.0),  # beyond every bound: +Inf only
        ("digits", "invalid", "nan", 0.002),
        ("_unknown", "not_found", "model_not_found", 0.0),
    ]
    for model, out, reason, seconds in observations:
        metrics.observe_infer(model, out, reason, seconds)
        requests.labels("infer", model, out, reason).inc()
        latency.labels(model, out).observe(seconds)
    metrics.count_request("metadata", "digits", "ok", "none")
    requests.labels("metadata", "digits", "ok", "none").inc()
    for _ in range(3):
        metrics.request_started()
        in_flight.inc()
    metrics.request_finished()
    in_flight.dec()
    metrics.count_source("digits", "device")
    metrics.count_source("digits", "cloud", 5)
    source.labels("digits", "device").inc()
    source.labels("digits", "cloud").inc(5)
    assert without_created(metrics.render()) == without_created(generate_latest(registry))
    created = re.findall(rb"^edgefleet_\w+_created\{[^}]*\} (\S+)$", metrics.render(), re.M)
    assert len(created) == 9  # 4 request series, 3 histogram series, 2 source series
    with pytest.raises(ValueError, match="non-negative"):
        metrics.count_source("digits", "device", -1)


# --- pipeline ------------------------------------------------------------------------------


def pipeline(bundles: DigitsBundles, **drift: Any) -> ModelPipeline:
    loaded = read_bundle(
        bundles.path(1),
        bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    runtime = load_runtime(loaded.artifact, "onnx")
    return ModelPipeline(
        loaded.manifest, runtime, ModelPolicy(), DriftConfig(window_values=BLOCK, **drift)
    )


def test_batch_one_rows_reach_drift_exactly_as_a_batch_does(
    digits_bundles: DigitsBundles,
) -> None:
    singles, batched = pipeline(digits_bundles), pipeline(digits_bundles)
    x = digits_bundles.x_eval[:BLOCK]
    for i in range(BLOCK):
        singles.run({"input": x[i : i + 1]})
    for start in range(0, BLOCK, 64):
        batched.run({"input": x[start : start + 64]})
    a, b = singles.collect_windows(), batched.collect_windows()
    assert [w.tensor for w in a] == [w.tensor for w in b] == ["input", "probabilities"]
    for wa, wb in zip(a, b, strict=True):
        assert wa.rows == wb.rows == BLOCK
        assert wa.view.to_bytes() == wb.view.to_bytes()
    assert singles.requests == BLOCK
    assert singles.rows == batched.rows == BLOCK
    assert len(singles.latency_quantiles()) == 3


def test_latency_ring_keeps_the_newest_samples(digits_bundles: DigitsBundles) -> None:
    p = pipeline(digits_bundles)
    now = [0.0]

    def clock() -> float:
        now[0] += 0.001 if p.requests < 2048 else 0.0005  # the first 2048 run at 1 ms
        return now[0]

    p._clock = clock
    x = digits_bundles.x_eval[:1]
    for _ in range(2048 + 2048):
        p.run({"input": x})
    assert p.latency_quantiles()["p99_ms"] == pytest.approx(0.5)


def test_compiled_onnxruntime_run_matches_the_public_run(digits_bundles: DigitsBundles) -> None:
    p = pipeline(digits_bundles)
    rt: Any = p.runtime
    assert rt._compiled_run is not None
    feeds = p.preprocess({"input": digits_bundles.x_eval[:5]})
    fast = rt.run(feeds)
    public = dict(zip(rt._output_names, rt._session.run(rt._output_names, feeds), strict=True))
    assert fast.keys() == public.keys()
    np.testing.assert_array_equal(fast["probabilities"], public["probabilities"])
    for bad in ({"other": feeds["input"]}, {"input": feeds["input"].astype(np.float64)}):
        with pytest.raises(InferenceError, match="onnxruntime failed"):
            rt.run(bad)
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.run(feeds)
