"""Benchmark the ONNX builder: every quantization mode against float, in the same run.

For the digits MLP, the digits CNN and the 1M-parameter MLP (all trained on the fly from
scikit-learn's bundled digits, nothing downloaded) this quantizes with each mode, gates the
result with the agent's onnxruntime adapter, and times float and quantized models with the same
thread settings. It prints one row per (model, mode) and checks the targets:

* int8 size <= 0.30x float for models under 1 MB, <= 0.26x above;
* accuracy within 0.5 point of float and >= 99% top-1 agreement (every mode, digits eval set);
* >= 1.5x batch-64 throughput for the >= 1M-parameter model (int8 modes);
* full build (quantize + gate) of the digits MLP under 10 s.

Usage:
    .venv/bin/python bench/bench_builder.py [--markdown] [--json out.json] [--threads 1]
        [--explore]

``--explore`` adds the variants tried while investigating missed targets (per-tensor weights,
QOperator format, no reduce_range, two threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.runtime.base import RuntimeOptions
from edge_agent.runtime.onnx import OnnxRuntime
from model_builder import examples
from model_builder.errors import AccuracyGateError, QuantizationError
from model_builder.evaluate.gate import GatePolicy, quantize_with_gate
from model_builder.evaluate.measure import Metrics, measure_onnx
from model_builder.evaluate.perf import LatencyStats, PerfReport, measure_perf
from model_builder.quantize.calibration import CalibrationSource
from model_builder.quantize.for_onnx import QuantizedModel, detect_target, quantize_onnx

MODELS: dict[str, Callable[[], examples.ExampleModel]] = {
    "digits-mlp": examples.digits_mlp,
    "digits-cnn": examples.digits_cnn,
    "digits-wide-mlp": examples.digits_wide_mlp,
}
MODES = ("static", "dynamic", "fp16")
ROUNDS = 5
ONE_MB = 1_000_000


def _paired_perf(
    ex: examples.ExampleModel, models: tuple[bytes, bytes], threads: int, seconds: float
) -> tuple[PerfReport, PerfReport]:
    """Time the float and the quantized model alternately, ``ROUNDS`` times each, and keep the
    median of the per-round medians: both see the same machine state (on a shared VM, load
    from neighbours comes and goes), which matters more than anything at these latencies."""
    opts = RuntimeOptions(intra_op_threads=threads, inter_op_threads=1)
    runtimes = [OnnxRuntime(m, opts) for m in models]
    feeds = {ex.input_name: ex.preprocessing.apply(ex.x_eval[:64])}
    rounds: list[list[PerfReport]] = [[], []]
    try:
        for _ in range(ROUNDS):
            for i, rt in enumerate(runtimes):
                budget = seconds / ROUNDS
                rounds[i].append(measure_perf(rt, feeds, len(models[i]), max_seconds=budget))
    finally:
        for rt in runtimes:
            rt.close()
    reports = []
    for i, reps in enumerate(rounds):
        stats = tuple(
            LatencyStats(
                b,
                sum(r.at(b).runs for r in reps),
                float(np.median([r.at(b).median_ms for r in reps])),
                float(np.median([r.at(b).p90_ms for r in reps])),
            )
            for b in (1, 64)
        )
        reports.append(PerfReport(len(models[i]), stats))
    return reports[0], reports[1]


def _variant_quantizer(
    ex: examples.ExampleModel, mode: str, target: str, variant: str
) -> Callable[[tuple[str, ...]], QuantizedModel]:
    cal = CalibrationSource.single(ex.input_name, ex.x_calib, ex.preprocessing)
    if variant == "qoperator":
        return lambda excl: _qoperator(ex, cal, target, excl)
    if variant == "forced":
        return lambda excl: _forced_dynamic(ex, target)
    if variant == "no zero points":
        return lambda excl: _drop_zero_points(
            quantize_onnx(ex.model_bytes, cal, mode, target, excl)
        )
    per_channel = False if variant == "per-tensor" else None
    return lambda excl: quantize_onnx(
        ex.model_bytes, cal, mode, target, excl, per_channel=per_channel
    )


def _qoperator(
    ex: examples.ExampleModel, cal: CalibrationSource, target: str, excl: tuple[str, ...]
) -> QuantizedModel:
    """QOperator-format static quantization, straight through onnxruntime (exploration only)."""
    import tempfile
    from dataclasses import replace

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from model_builder.quantize.plan import TARGETS

    base = quantize_onnx(ex.model_bytes, cal, "static", target, excl)  # for recipe and nodes
    prof = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("in.onnx", "pre.onnx", "q.onnx"))
        src.write_bytes(ex.model_bytes)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            cal.reader({ex.input_name: "float32"}),
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            reduce_range=prof.reduce_range,
            activation_type=QuantType[prof.activation_type],
            weight_type=QuantType[prof.weight_type],
            nodes_to_exclude=list(excl),
            op_types_to_quantize=list(base.recipe.op_types),
        )
        data = out.read_bytes()
    return replace(base, model_bytes=data, recipe=replace(base.recipe, quant_format="QOperator"))


def _forced_dynamic(ex: examples.ExampleModel, target: str) -> QuantizedModel:
    """Dynamic quantization straight through onnxruntime, past our Conv refusal: it measures
    why the refusal exists (exploration only)."""
    import tempfile
    from dataclasses import replace

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from model_builder.quantize.plan import TARGETS

    base = quantize_onnx(ex.model_bytes, None, "fp16", target)  # for the recipe shape only
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(ex.model_bytes)
        quantize_dynamic(
            str(src),
            str(out),
            weight_type=QuantType.QInt8,
            reduce_range=TARGETS[target].reduce_range,
        )
        data = out.read_bytes()
    recipe = replace(base.recipe, mode="dynamic", weight_type="QInt8", quant_format="QOperator")
    return replace(base, model_bytes=data, recipe=recipe)


def _drop_zero_points(q: QuantizedModel) -> QuantizedModel:
    """Remove all-zero int8/int32 zero points from DequantizeLinear nodes (they are optional in
    ONNX and default to 0): a size-only post-pass tried for the small-model size target."""
    from dataclasses import replace

    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(q.model_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in inits:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype in (np.int8, np.int32) and not zp.any():
                del node.input[2]
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return replace(q, model_bytes=model.SerializeToString())


def bench_model(name: str, threads: int, seconds: float, explore: bool) -> list[dict[str, Any]]:
    ex = MODELS[name]()
    policy = GatePolicy()
    contract = ex.output_contract()

    def measure(model: bytes) -> Metrics:
        return measure_onnx(model, ex.x_eval, ex.y_eval, ex.preprocessing, contract)

    float_metrics = measure(ex.model_bytes)
    configs: list[tuple[str, str, str, int]] = [(m, "default", "x86", threads) for m in MODES]
    if explore:
        configs += [
            ("static", "per-tensor", "x86", threads),
            ("static", "no-reduce-range", "x86-vnni", threads),
            ("static", "qoperator", "x86", threads),
            ("static", "no zero points", "x86", threads),
            ("static", "default", "x86", 2),
        ]
        if name == "digits-cnn":
            configs.append(("dynamic", "forced", "x86", threads))
    rows = []
    for mode, variant, target, n_threads in configs:
        label = mode if variant == "default" else f"{mode} ({variant})"
        if n_threads != threads:
            label += f" [{n_threads} threads]"
        row: dict[str, Any] = {
            "model": name,
            "params": ex.num_parameters,
            "mode": label,
            "target": target,
            "threads": n_threads,
            "float_size": len(ex.model_bytes),
            "float_accuracy": float_metrics.value,
        }
        quantize = _variant_quantizer(ex, mode, target, variant)
        t0 = time.perf_counter()
        try:
            outcome = quantize_with_gate(ex.model_bytes, quantize, measure, policy)
        except QuantizationError as exc:
            # "dynamic quantization refused: the graph has Conv, and ..." -> "the graph has Conv"
            rows.append({**row, "refused": str(exc).split(": ", 1)[-1].split(",")[0]})
            continue
        except AccuracyGateError as exc:
            rows.append({**row, "refused": f"gate failed: {exc}"})
            continue
        build_s = time.perf_counter() - t0
        q = outcome.model.model_bytes
        ref_perf, q_perf = _paired_perf(ex, (ex.model_bytes, q), n_threads, seconds)
        row |= {
            "size": len(q),
            "size_ratio": len(q) / len(ex.model_bytes),
            "accuracy": outcome.quant_metrics.value,
            "acc_delta_pts": (outcome.quant_metrics.value - float_metrics.value) * 100,
            "agreement": outcome.verdict.agreement,
            "b1_speedup": ref_perf.at(1).median_ms / q_perf.at(1).median_ms,
            "b64_throughput_ratio": q_perf.at(64).throughput / ref_perf.at(64).throughput,
            "float_b1_ms": ref_perf.at(1).median_ms,
            "quant_b1_ms": q_perf.at(1).median_ms,
            "float_b64_ms": ref_perf.at(64).median_ms,
            "quant_b64_ms": q_perf.at(64).median_ms,
            "build_s": build_s,
            "excluded": list(outcome.model.recipe.excluded_nodes),
            "recipe": outcome.model.recipe.to_dict(),
        }
        row["checks"] = _checks(row, mode)
        rows.append(row)
    return rows


def _checks(row: dict[str, Any], mode: str) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    if mode in ("static", "dynamic"):
        limit = 0.30 if row["float_size"] < ONE_MB else 0.26
        checks[f"size<={limit:.2f}x"] = row["size_ratio"] <= limit
        if row["params"] >= 1_000_000:
            checks["b64>=1.5x"] = row["b64_throughput_ratio"] >= 1.5
    checks["acc within 0.5pt"] = row["acc_delta_pts"] >= -0.5
    checks["agree>=99%"] = row["agreement"] >= 0.99
    if row["model"] == "digits-mlp":
        checks["build<10s"] = row["build_s"] < 10.0
    return checks


HEADER = (
    "model",
    "params",
    "mode",
    "size ratio",
    "acc delta (pts)",
    "agreement",
    "b1 latency speedup",
    "b64 throughput ratio",
    "build s (quantize+gate)",
    "targets",
)


def _cells(row: dict[str, Any]) -> list[str]:
    head = [row["model"], f"{row['params']:,}", row["mode"]]
    if "refused" in row:
        return [*head, "-", "-", "-", "-", "-", "-", f"refused: {row['refused']}"]
    checks = ", ".join(f"{k} {'ok' if v else 'MISS'}" for k, v in row["checks"].items())
    return [
        *head,
        f"{row['size_ratio']:.3f}x",
        f"{row['acc_delta_pts']:+.2f}",
        f"{row['agreement']:.2%}",
        f"{row['b1_speedup']:.2f}x",
        f"{row['b64_throughput_ratio']:.2f}x",
        f"{row['build_s']:.2f}",
        checks,
    ]


TIMING_HEADER = (
    "model",
    "mode",
    "size bytes (float -> quant)",
    "b1 ms (float -> quant)",
    "b64 ms (float -> quant)",
    "nodes kept in float",
)


def _timing_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["model"],
        row["mode"],
        f"{row['float_size']:,} -> {row['size']:,}",
        f"{row['float_b1_ms']:.3f} -> {row['quant_b1_ms']:.3f}",
        f"{row['float_b64_ms']:.3f} -> {row['quant_b64_ms']:.3f}",
        ", ".join(row["excluded"]) or "-",
    ]


def _table(header: tuple[str, ...], body: list[list[str]], markdown: bool) -> str:
    table = [list(header), *body]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table)


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    main = _table(HEADER, [_cells(r) for r in rows], markdown)
    timed = [_timing_cells(r) for r in rows if "refused" not in r]
    return (
        main
        + "\n\nAbsolute figures (median of single runs):\n\n"
        + _table(TIMING_HEADER, timed, markdown)
    )


def machine_info() -> dict[str, Any]:
    import onnxruntime

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "target": detect_target(),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="timing budget per model and batch size"
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--explore", action="store_true", help="add investigation variants")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += bench_model(name, args.threads, args.seconds, args.explore)
    info = machine_info()
    print(
        f"Run {info['date']}: {info['cpu']} ({info['machine']}, {info['cores']} cores, target "
        f"{info['target']}), onnxruntime {info['onnxruntime']}, {args.threads} intra-op thread(s)"
    )
    print(render(rows, args.markdown))
    missed = [
        (r["model"], r["mode"], k) for r in rows for k, v in r.get("checks", {}).items() if not v
    ]
    print(f"\nmissed targets: {missed or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
