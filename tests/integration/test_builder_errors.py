"""model-builder build with wrong contracts, wrong data and failing gates, through the CLI.

Every case must end in one ``error[<code>]: ...`` line with the documented exit code, never a
traceback; a gate failure writes the full report (file and ``--json``) with the diagnosis.
Real digits models, real onnxruntime, real keys.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from edge_agent.errors import EXIT_BAD_INPUT, EXIT_GATE, EXIT_KEYS, EXIT_RUNTIME, EXIT_USAGE
from model_builder import cli as builder_cli
from model_builder.examples import save_example
from support import build_argv

Edit = Callable[[dict[str, Any]], None]


def run(args: list[str]) -> Result:
    """Invoke through ``main`` so the error boundary and its exit codes are what is tested."""

    @click.command(
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "help_option_names": [],
        }
    )
    @click.pass_context
    def wrapper(ctx: click.Context) -> None:
        builder_cli.main(list(ctx.args))

    return CliRunner().invoke(wrapper, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    save_example("digits-mlp", root / "mlp")
    save_example("digits-outlier-mlp", root / "outlier")
    assert run(["keys", "init", str(root / "keys")]).exit_code == 0
    return root


def _build(ws: Path, out: Path, *extra: str, model: str = "mlp") -> Result:
    ex = ws / model
    args = [
        "build",
        str(ex / "model.onnx"),
        "--calib",
        str(ex / "calib.npz"),
        "--eval",
        str(ex / "eval.npz"),
        "--name",
        "digits",
        "--version",
        "1",
        "--keystore",
        str(ws / "keys"),
        "--out",
        str(out),
        "--no-rescue",
    ]
    # later options win in click: a test's --contract/--eval replace the defaults above
    if "--contract" not in extra:
        args += ["--contract", str(ex / "contract.json")]
    return run([*args, *extra])


def _tensor(d: dict[str, Any]) -> dict[str, Any]:
    tensor: dict[str, Any] = d["inputs"]["tensors"][0]
    return tensor


CONTRACT_CASES: list[tuple[str, Edit, str]] = [
    (
        "output name",
        lambda d: d["outputs"].update(outputs=["nope"], score_output="nope"),
        "contract outputs ['nope'] are not outputs of the model",
    ),
    (
        "score output name",
        lambda d: d["outputs"].update(outputs=["probabilities"], score_output="logits"),
        "score_output",
    ),
    ("input name", lambda d: _tensor(d).update(name="pixels"), "unknown ['pixels']"),
    (
        "extra input",
        lambda d: d["inputs"]["tensors"].append({**copy.deepcopy(_tensor(d)), "name": "other"}),
        "unknown ['other']",
    ),
    ("rank", lambda d: _tensor(d)["shape"].append({"size": 1}), "rank 3"),
    ("fixed size", lambda d: _tensor(d)["shape"].__setitem__(1, {"size": 65}), "dimension 1"),
    (
        "dynamic inner dimension",
        lambda d: _tensor(d)["shape"].__setitem__(1, {"min": 1, "max": 64}),
        "dimension 1",
    ),
    ("bool dtype", lambda d: _tensor(d).update(dtype="bool"), "cannot feed"),
    (
        "int dtype vs float data",
        lambda d: _tensor(d).update(dtype="int64"),
        "the evaluation data does not fit the contract",
    ),
    ("label count", lambda d: d["outputs"].update(labels=["a", "b", "c"]), "3 labels"),
    (
        "preprocessing size",
        lambda d: _tensor(d)["preprocessing"].update(scale=[1.0, 2.0], offset=[0.0, 0.0]),
        "preprocessing scale has 2 values",
    ),
    (
        "range size",
        lambda d: _tensor(d).update(ranges={"low": [0.0, 0.0], "high": [16.0, 16.0]}),
        "2 ranges for 64 features",
    ),
    ("raw task", lambda d: d["outputs"].update(task="raw"), "cannot score a 'raw' output"),
    ("not a contract", lambda d: d.pop("outputs"), "cannot read contract"),
]


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in CONTRACT_CASES], ids=[c[0] for c in CONTRACT_CASES]
)
def test_wrong_contract_is_one_typed_line(
    ws: Path, tmp_path: Path, edit: Edit, message: str
) -> None:
    contract = json.loads((ws / "mlp" / "contract.json").read_text())
    edit(contract)
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(contract))
    res = _build(ws, tmp_path / "out", "--contract", str(path))
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(("error[contract_mismatch]", "error[input_data]"))
    assert message in last
    assert "Traceback" not in res.output
    assert not (tmp_path / "out" / "digits-1.efb").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _corrupt(src: Path, dst: Path) -> Path:
    raw = bytearray(src.read_bytes())
    for i in range(200, 400):
        raw[i] ^= 0xFF
    return _write(dst, bytes(raw))


def _compressed(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez_compressed(path, input=rng.random((50, 64)), y=np.arange(50) % 10)
    return path


DATA_CASES: list[tuple[str, Callable[[Path, Path], Path], str]] = [
    ("not a zip", lambda d, ws: _write(d / "e.npz", b"garbage"), "cannot read"),
    ("truncated", lambda d, ws: _write(d / "e.npz", (ws / "mlp/eval.npz").read_bytes()[:300]), ""),
    ("bad deflate stream", lambda d, ws: _corrupt(_compressed(d / "c.npz"), d / "e.npz"), ""),
    (
        "no array for the input",
        lambda d, ws: _npz(d / "e.npz", pixels=np.zeros((3, 64)), y=np.arange(3)),
        "lacks arrays for inputs ['input']",
    ),
    (
        "object array",
        lambda d, ws: _npz(d / "e.npz", input=np.array([{}], dtype=object), y=np.arange(1)),
        "cannot read",
    ),
    (
        "strings",
        lambda d, ws: _npz(d / "e.npz", input=np.array([["a"] * 64] * 3), y=np.arange(3)),
        "not numbers",
    ),
    (
        "complex",
        lambda d, ws: _npz(d / "e.npz", input=np.zeros((3, 64), complex), y=np.arange(3)),
        "not numbers",
    ),
    (
        "wrong sample shape",
        lambda d, ws: _npz(d / "e.npz", input=np.zeros((3, 63)), y=np.arange(3)),
        "do not fit",
    ),
    (
        "labels per sample",
        lambda d, ws: _npz(d / "e.npz", input=np.zeros((3, 64)), y=np.zeros((3, 3))),
        "one label per sample",
    ),
    (
        "label count",
        lambda d, ws: _npz(d / "e.npz", input=np.zeros((3, 64)), y=np.arange(2)),
        "disagree",
    ),
    ("no labels", lambda d, ws: _npz(d / "e.npz", input=np.zeros((3, 64))), "needs labels"),
    ("csv", lambda d, ws: _write(d / "e.csv", b"a,b\n1,x\n"), "non-numeric"),
    ("unknown suffix", lambda d, ws: _write(d / "e.parquet", b"PAR1"), "unsupported data file"),
]


@pytest.mark.parametrize(
    ("make", "message"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_unusable_evaluation_data_is_one_typed_line(
    ws: Path, tmp_path: Path, make: Callable[[Path, Path], Path], message: str
) -> None:
    res = _build(ws, tmp_path / "out", "--eval", str(make(tmp_path, ws)))
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(("error[input_data]", "error[contract_mismatch]"))
    assert message in last
    assert "Traceback" not in res.output


def test_gate_failure_writes_the_full_report_and_diagnosis(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _build(ws, out, model="outlier")
    assert res.exit_code == EXIT_GATE, res.output
    assert "gate: FAILED" in res.output
    assert "diagnosis: " in res.output
    assert "calibration input:" in res.output
    assert res.output.strip().splitlines()[-1].startswith("error[accuracy_gate]")
    report = json.loads((out / "digits-1.report.json").read_text())
    assert not (out / "digits-1.efb").exists()
    assert report["gate"]["passed"] is False
    assert report["gate"]["reasons"]
    assert report["float"]["value"] > 0.9 > report["quantized"]["value"]
    assert set(report["calibration"]["input"]) >= {"min", "max", "mean", "std"}
    assert any("outliers" in d for d in report["diagnosis"])
    assert any("--no-rescue" in d for d in report["diagnosis"])
    assert report["contract_check"]["rows"] == 450


def test_gate_failure_with_json_prints_the_report(ws: Path, tmp_path: Path) -> None:
    # No rescue can pass with zero float nodes: the search runs its single trials and gives up.
    ex = ws / "outlier"
    res = run(
        [
            *build_argv(ex, keys=ws / "keys", out=tmp_path, version=2),
            "--max-exclusions",
            "0",
            "--json",
        ]
    )
    assert res.exit_code == EXIT_GATE
    start = res.output.index("{")
    end = res.output.rindex("}") + 1
    printed = json.loads(res.output[start:end])
    stored = json.loads((tmp_path / "digits-2.report.json").read_text())
    assert printed == stored
    assert stored["rescue"]["single_trials"]
    assert stored["rescue"]["best"]["value"] > stored["quantized"]["value"]
    assert any("rescue search tried" in d for d in stored["diagnosis"])


def test_wrong_output_name_as_a_subprocess(ws: Path, tmp_path: Path) -> None:
    contract = json.loads((ws / "mlp" / "contract.json").read_text())
    contract["outputs"].update(outputs=["nope"], score_output="nope")
    (tmp_path / "c.json").write_text(json.dumps(contract))
    ex = ws / "mlp"
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_DEBUG"}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "model-builder"),
            *build_argv(
                ex, keys=ws / "keys", out=tmp_path / "out", version=1, contract=tmp_path / "c.json"
            ),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error[contract_mismatch]")


MISSING_CASES: list[tuple[str, Callable[[Path, Path], list[str]], int, str]] = [
    (
        "model file",
        lambda ws, tmp: ["build", str(tmp / "none.onnx"), *_data_args(ws)],
        EXIT_USAGE,
        "does not exist",
    ),
    (
        "calibration file",
        lambda ws, tmp: [
            "build",
            str(ws / "mlp" / "model.onnx"),
            *_data_args(ws, calib=tmp / "none.npz"),
        ],
        EXIT_USAGE,
        "does not exist",
    ),
    (
        "contract file",
        lambda ws, tmp: [
            "build",
            str(ws / "mlp" / "model.onnx"),
            *_data_args(ws),
            "--contract",
            str(tmp / "none.json"),
        ],
        EXIT_USAGE,
        "does not exist",
    ),
    (
        "key store",
        lambda ws, tmp: [
            "build",
            str(ws / "mlp" / "model.onnx"),
            *_data_args(ws, keys=tmp / "nokeys"),
        ],
        EXIT_KEYS,
        "error[keystore]",
    ),
    (
        "model that is not a model",
        lambda ws, tmp: ["build", str(_write(tmp / "junk.onnx", b"junk")), *_data_args(ws)],
        EXIT_RUNTIME,
        "error[model_load]",
    ),
    (
        "unknown model suffix",
        lambda ws, tmp: ["build", str(_write(tmp / "model.pt", b"junk")), *_data_args(ws)],
        EXIT_BAD_INPUT,
        "expected a .onnx or .tflite model",
    ),
    (
        "output directory is a file",
        lambda ws, tmp: [
            "build",
            str(ws / "mlp" / "model.onnx"),
            *_data_args(ws, out=_write(tmp / "file", b"")),
        ],
        EXIT_USAGE,
        "is a file",
    ),
    (
        "output directory under a file",
        lambda ws, tmp: [
            "build",
            str(ws / "mlp" / "model.onnx"),
            *_data_args(ws, out=_write(tmp / "file", b"") / "sub"),
        ],
        EXIT_BAD_INPUT,
        "error[os]",
    ),
]


def _data_args(
    ws: Path, *, calib: Path | None = None, keys: Path | None = None, out: Path | None = None
) -> list[str]:
    return [
        "--calib",
        str(calib or ws / "mlp" / "calib.npz"),
        "--eval",
        str(ws / "mlp" / "eval.npz"),
        "--name",
        "digits",
        "--version",
        "1",
        "--keystore",
        str(keys or ws / "keys"),
        "--out",
        str(out or ws / "out-missing"),
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [c[1:] for c in MISSING_CASES],
    ids=[c[0] for c in MISSING_CASES],
)
def test_missing_or_unusable_files_are_one_line(
    ws: Path, tmp_path: Path, args: Callable[[Path, Path], list[str]], code: int, message: str
) -> None:
    res = run(args(ws, tmp_path))
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert message in res.output


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors")
def test_tflite_gate_failure_writes_the_report(tmp_path: Path, ws: Path) -> None:
    """Calibration data 50x too large: int8 ranges too wide, the static TFLite model collapses."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    np.savez(tmp_path / "calib.npz", x=x[:300] * 50)
    np.savez(tmp_path / "eval.npz", x=x[-400:], y=y[-400:])
    name, out_name = "serving_default_pixels:0", "PartitionedCall:0"
    contract = {
        "inputs": {
            "tensors": [
                {
                    "name": name,
                    "dtype": "float32",
                    "shape": [{"min": 1, "max": 64, "name": "batch"}, {"size": 64}],
                    "preprocessing": {"kind": "affine", "scale": [0.0625], "offset": [0.0]},
                }
            ],
        },
        "outputs": {
            "task": "classification",
            "outputs": [out_name],
            "labels": [str(i) for i in range(10)],
            "score_output": out_name,
        },
    }
    (tmp_path / "contract.json").write_text(json.dumps(contract))
    fixtures = Path(__file__).parents[1] / "fixtures" / "tflite"
    res = run(
        [
            "build",
            str(fixtures / "digits_mlp.tflite"),
            "--calib",
            str(tmp_path / "calib.npz"),
            "--eval",
            str(tmp_path / "eval.npz"),
            "--contract",
            str(tmp_path / "contract.json"),
            "--name",
            "digits-tfl",
            "--version",
            "1",
            "--keystore",
            str(ws / "keys"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert res.exit_code == EXIT_GATE, res.output
    report = json.loads((tmp_path / "out" / "digits-tfl-1.report.json").read_text())
    assert report["format"] == "tflite"
    assert report["calibration"][name]["looks_unnormalised"] is True
    assert report["diagnosis"][0].startswith(f"calibration input {name!r} looks un-normalised")
    assert any("--mode dynamic" in d for d in report["diagnosis"])
    assert not (tmp_path / "out" / "digits-tfl-1.efb").exists()
