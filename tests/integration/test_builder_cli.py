"""model-builder end to end: in-process with CliRunner, and once as real subprocesses.

Real models (trained from scikit-learn's bundled digits), real onnxruntime and LiteRT sessions,
real Ed25519 keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from edge_agent.bundle import read_bundle
from edge_agent.contract import BundleManifest
from edge_agent.errors import EXIT_BAD_INPUT, EXIT_GATE, EXIT_UNTRUSTED
from model_builder import cli as builder_cli
from model_builder.examples import save_example
from model_builder.keystore import KeyStore
from support import build_argv, members, repack

TFLITE = Path(__file__).parents[1] / "fixtures" / "tflite"


def run(args: list[str], entry: Callable[[list[str]], None] = builder_cli.main) -> Result:
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
        entry(list(ctx.args))

    return CliRunner().invoke(wrapper, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_example("digits-mlp", root / "mlp")
    save_example("digits-outlier-mlp", root / "outlier")
    assert run(["keys", "init", str(root / "keys")]).exit_code == 0
    return root


@pytest.fixture(scope="module")
def built(workspace: Path) -> Path:
    ex = workspace / "mlp"
    result = run(
        [
            *build_argv(ex, keys=workspace / "keys", out=workspace / "out", version=3),
            "--kll",
            "64",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "gate: PASSED" in result.output
    return workspace / "out" / "digits-3.efb"


def test_build_writes_a_verifiable_bundle_with_report(built: Path, workspace: Path) -> None:
    store = KeyStore.open(workspace / "keys")
    loaded = read_bundle(
        built, store.trusted_root(), now=datetime.now(UTC), installed_version=None, device=None
    )
    m = loaded.manifest
    assert (m.name, m.version, m.artifact.format) == ("digits", 3, "onnx")
    report = json.loads((workspace / "out" / "digits-3.report.json").read_text())
    assert report["gate"]["passed"] is True
    assert report["quantized"]["size_bytes"] < report["float"]["size_bytes"]
    assert {row["batch"] for row in report["quantized"]["perf"]["latency"]} == {1, 64}
    assert m.report["mode"] == "static"
    assert m.baseline.kll  # tier B requested with --kll
    assert len(m.golden) == 8
    assert m.compatibility.runtime == "onnxruntime"


def test_inspect_prints_manifest_report_and_signatures(built: Path) -> None:
    human = run(["inspect", str(built)])
    assert human.exit_code == 0
    assert "digits v3 (stable)" in human.output
    assert "1 signature(s)" in human.output
    assert "batch-64 throughput" in human.output
    as_json = json.loads(run(["inspect", str(built), "--json"]).output)
    assert as_json["manifest"]["version"] == 3
    assert len(as_json["signatures"]) == 1


def test_verify_accepts_then_refuses_a_tampered_copy(
    built: Path, workspace: Path, tmp_path: Path
) -> None:
    ok = run(["verify", str(built), "--root", str(workspace / "keys" / "root.json")])
    assert ok.exit_code == 0, ok.output
    parts = members(built.read_bytes())
    art = bytearray(parts["model.onnx"])
    art[-1] ^= 0xFF
    parts["model.onnx"] = bytes(art)
    bad = tmp_path / "bad.efb"
    bad.write_bytes(repack(parts))
    refused = run(["verify", str(bad), "--root", str(workspace / "keys" / "root.json")])
    assert refused.exit_code == EXIT_UNTRUSTED
    assert "error[digest_mismatch]" in refused.output


def test_verify_refuses_wrong_architecture(built: Path, workspace: Path) -> None:
    res = run(
        [
            "verify",
            str(built),
            "--keystore",
            str(workspace / "keys"),
            "--arch",
            "aarch64",
            "--runtime-version",
            "1.32.0",
        ]
    )
    assert res.exit_code == EXIT_UNTRUSTED
    assert "incompatible_target" in res.output


def test_gate_failure_is_rescued_and_reported(workspace: Path) -> None:
    ex = workspace / "outlier"
    common = [
        str(ex / "model.onnx"),
        "--calib",
        str(ex / "calib.npz"),
        "--eval",
        str(ex / "eval.npz"),
        "--contract",
        str(ex / "contract.json"),
        "--name",
        "outlier",
        "--keystore",
        str(workspace / "keys"),
        "--out",
        str(workspace / "out"),
    ]
    refused = run(["build", *common, "--version", "1", "--no-rescue"])
    assert refused.exit_code == EXIT_GATE
    assert "accuracy gate" in refused.output
    rescued = run(["build", *common, "--version", "2", "--json"])
    assert rescued.exit_code == 0, rescued.output
    report = json.loads(rescued.output[rescued.output.index("{") :])
    assert report["gate"]["passed"] is True
    assert report["excluded_nodes"], "the rescue search must name the nodes kept in float"
    assert report["rescue"]["single_trials"]


def test_bad_data_file_gives_input_error(workspace: Path, tmp_path: Path) -> None:
    ex = workspace / "mlp"
    bad = tmp_path / "calib.npz"
    np.savez(bad, wrong_name=np.zeros((4, 3)))
    res = run(
        [
            "build",
            str(ex / "model.onnx"),
            "--calib",
            str(bad),
            "--eval",
            str(ex / "eval.npz"),
            "--name",
            "digits",
            "--version",
            "9",
            "--keystore",
            str(workspace / "keys"),
            "--out",
            str(tmp_path),
        ]
    )
    assert res.exit_code == EXIT_BAD_INPUT
    assert "error[input_data]" in res.output


def test_threshold_two_needs_cosign(workspace: Path, tmp_path: Path) -> None:
    keys = tmp_path / "k2"
    assert (
        run(
            ["keys", "init", str(keys), "--targets-keys", "2", "--targets-threshold", "2"]
        ).exit_code
        == 0
    )
    ex = workspace / "mlp"
    out = tmp_path / "out"
    # The builder signs with every targets key it holds; strip one signature to model a
    # second, separately held key that has not signed yet.
    assert run(build_argv(ex, keys=keys, out=out, version=1)).exit_code == 0
    bundle = out / "digits-1.efb"
    parts = members(bundle.read_bytes())
    doc = json.loads(parts["targets.json"])
    doc["signatures"] = doc["signatures"][:1]
    parts["targets.json"] = json.dumps(doc).encode()
    bundle.write_bytes(repack(parts))
    root = str(keys / "root.json")
    assert run(["verify", str(bundle), "--root", root]).exit_code == EXIT_UNTRUSTED
    labels = [
        k["label"]
        for k in json.loads(run(["keys", "list", str(keys), "--json"]).output)["keys"]
        if "targets" in k["roles"]
    ]
    missing = next(
        lbl
        for lbl in labels
        if KeyStore.open(keys).signer(lbl).public_key.keyid != doc["signatures"][0]["keyid"]
    )
    assert run(["sign", str(bundle), "--keystore", str(keys), "--key", missing]).exit_code == 0
    assert run(["verify", str(bundle), "--root", root]).exit_code == 0


def test_key_rotation_and_revocation_through_the_cli(workspace: Path, tmp_path: Path) -> None:
    keys = tmp_path / "k"
    assert run(["keys", "init", str(keys)]).exit_code == 0
    listing = json.loads(run(["keys", "list", str(keys), "--json"]).output)
    old = next(k["keyid"] for k in listing["keys"] if k["label"] == "targets-1")
    ex = workspace / "mlp"
    assert run(build_argv(ex, keys=keys, out=tmp_path, version=1)).exit_code == 0
    assert run(["keys", "rotate", str(keys), "--role", "targets", "--add", "1"]).exit_code == 0
    assert run(["keys", "revoke", str(keys), old]).exit_code == 0
    v1 = str(keys / "roots" / "1.root.json")
    chain = [
        "--root-update",
        str(keys / "roots" / "2.root.json"),
        "--root-update",
        str(keys / "roots" / "3.root.json"),
    ]
    assert run(["verify", str(tmp_path / "digits-1.efb"), "--root", v1]).exit_code == 0
    res = run(["verify", str(tmp_path / "digits-1.efb"), "--root", v1, *chain])
    assert res.exit_code == EXIT_UNTRUSTED
    assert "signature_threshold" in res.output


def test_tflite_model_builds_into_a_litert_bundle(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    np.savez(tmp_path / "calib.npz", x=x[:300])
    np.savez(tmp_path / "eval.npz", x=x[-400:], y=y[-400:])
    name = "serving_default_pixels:0"
    contract = {
        "inputs": {
            "max_payload_bytes": 1 << 20,
            "tensors": [
                {
                    "name": name,
                    "dtype": "float32",
                    "nan_policy": "reject",
                    "shape": [{"min": 1, "max": 64, "name": "batch"}, {"size": 64}],
                    "ranges": {"low": [0.0], "high": [16.0]},
                    "preprocessing": {"kind": "affine", "scale": [0.0625], "offset": [0.0]},
                }
            ],
        },
        "outputs": {
            "task": "classification",
            "outputs": ["PartitionedCall:0"],
            "labels": [str(i) for i in range(10)],
            "score_output": "PartitionedCall:0",
            "score_kind": "probabilities",
        },
    }
    (tmp_path / "contract.json").write_text(json.dumps(contract))
    assert run(["keys", "init", str(tmp_path / "keys")]).exit_code == 0
    res = run(
        [
            "build",
            str(TFLITE / "digits_mlp.tflite"),
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
            "--mode",
            "dynamic",
            "--keystore",
            str(tmp_path / "keys"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert res.exit_code == 0, res.output
    raw = members((tmp_path / "out" / "digits-tfl-1.efb").read_bytes())
    manifest = BundleManifest.from_bytes(raw["manifest.json"])
    assert manifest.compatibility.runtime == "litert"
    assert "model.tflite" in raw
    assert manifest.report["gate"]["passed"] is True


def test_console_scripts_as_subprocesses(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    demo = subprocess.run(
        [str(bindir / "model-builder"), "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr + demo.stdout
    assert "golden samples: 8/8 passed" in demo.stdout
    verify = subprocess.run(
        [
            str(bindir / "edge-agent"),
            "verify",
            str(tmp_path / "digits-1.efb"),
            "--root",
            str(tmp_path / "keys" / "root.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["trusted"] is True
    bad = subprocess.run(
        [str(bindir / "model-builder"), "inspect", str(tmp_path / "nope.efb")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2  # click usage error: the file does not exist
    garbage = tmp_path / "garbage.efb"
    garbage.write_bytes(b"not a tar" * 100)
    res = subprocess.run(
        [str(bindir / "model-builder"), "inspect", str(garbage)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == EXIT_BAD_INPUT
    assert res.stderr.startswith("error[bundle_format]")
