"""The ``build`` and ``demo`` commands: file handling, progress display and the summary.

``build --compare-to CHAMPION.efb`` reads and verifies the champion here (with the key store's
root, as ``model-builder verify --keystore`` does) and hands it to ``build_bundle``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_agent.bundle import read_bundle, write_bundle
from edge_agent.cli.support import passphrase_from_env
from edge_agent.contract import Preprocessing
from edge_agent.quality.compare import ComparisonLimits
from edge_agent.runtime.device import detect_device_profile
from edge_agent.runtime.golden import check_golden
from edge_agent.runtime.loader import load_runtime
from model_builder.build import BuildResult, build_bundle
from model_builder.build_parts import run_all
from model_builder.config import BuildConfig
from model_builder.data import RANGE_MARGIN, infer_contract, load_contract, load_dataset
from model_builder.errors import AccuracyGateError, ChampionRegressionError, InputDataError
from model_builder.evaluate.compare import Champion, load_champion
from model_builder.evaluate.contract_check import RefusalReport, describe_refusals
from model_builder.evaluate.failure import render_failure
from model_builder.evaluate.gate import GatePolicy
from model_builder.evaluate.report import render_table
from model_builder.keystore import KeyStore
from model_builder.quantize.calibration import ProgressFn


def _progress() -> ProgressFn:
    """One updating line per stage on a terminal; one line per finished stage otherwise."""
    tty = sys.stderr.isatty()
    last: dict[str, int] = {}

    def show(done: int, total: int, label: str) -> None:
        if tty:
            end = "\n" if done >= total else ""
            click.echo(f"\r  {label}: {done}/{total}", err=True, nl=False)
            if end:
                click.echo("", err=True)
        elif done >= total and last.get(label) != total:
            click.echo(f"  {label}: {total}/{total}", err=True)
        last[label] = done

    return show


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--calib",
    "calib_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration data (.npz/.npy/.csv), raw: the declared preprocessing is applied.",
)
@click.option(
    "--eval",
    "eval_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labelled evaluation data (.npz with y, or .csv with a label column).",
)
@click.option(
    "--contract",
    "contract_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Input/output contract (JSON or TOML); inferred from the data when omitted.",
)
@click.option("--name", required=True, help="Model name ([a-z0-9._-]).")
@click.option("--version", "version", required=True, type=int, help="Monotonic model version.")
@click.option("--channel", default="stable", show_default=True)
@click.option(
    "--mode",
    default="static",
    show_default=True,
    type=click.Choice(["static", "dynamic", "fp16", "auto"]),
)
@click.option(
    "--target",
    default=None,
    type=click.Choice(["x86", "x86-vnni", "arm64"]),
    help="CPU family the bundle is for (default: the portable x86 or arm64 of this machine's "
    "family; x86-vnni only when asked, and then devices need VNNI).",
)
@click.option(
    "--range-margin",
    default=RANGE_MARGIN,
    show_default=True,
    help="Without --contract: widen inferred input ranges by this many feature spans.",
)
@click.option("--arch", multiple=True, help="Override the signed architectures (or 'any').")
@click.option("--max-abs-drop", default=0.01, show_default=True)
@click.option("--max-rel-drop", default=0.01, show_default=True)
@click.option("--min-agreement", default=0.99, show_default=True)
@click.option(
    "--compare-to",
    "compare_to",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The signed bundle this model replaces (same --name): verify it with the key store's "
    "root, run both on the evaluation data, and fail the build if the new model regressed.",
)
@click.option(
    "--max-accuracy-drop",
    default=ComparisonLimits().max_accuracy_drop,
    show_default=True,
    help="With --compare-to: largest significant accuracy drop allowed against the champion.",
)
@click.option(
    "--max-recall-drop",
    default=ComparisonLimits().max_recall_drop,
    show_default=True,
    help="With --compare-to: largest significant per-class recall drop allowed.",
)
@click.option(
    "--allow-regression",
    "allow_regression",
    default=None,
    metavar="REASON",
    help="With --compare-to: sign the bundle even if it regressed; REASON is recorded in the "
    "signed report.",
)
@click.option("--no-rescue", is_flag=True, help="Fail instead of searching for float fallbacks.")
@click.option("--max-exclusions", default=8, show_default=True)
@click.option("--kll", "kll_k", type=int, default=None, help="Add tier-B KLL sketches (k).")
@click.option("--expires-days", default=365, show_default=True)
@click.option(
    "--keystore", "keystore_dir", required=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build(
    model: Path,
    calib_path: Path,
    eval_path: Path,
    contract_path: Path | None,
    name: str,
    version: int,
    channel: str,
    mode: str,
    target: str | None,
    arch: tuple[str, ...],
    max_abs_drop: float,
    max_rel_drop: float,
    min_agreement: float,
    no_rescue: bool,
    max_exclusions: int,
    kll_k: int | None,
    expires_days: int,
    keystore_dir: Path,
    out_dir: Path,
    as_json: bool,
    range_margin: float,
    compare_to: Path | None,
    max_accuracy_drop: float,
    max_recall_drop: float,
    allow_regression: str | None,
) -> None:
    """Quantize MODEL, gate its accuracy, attach contract/baseline/golden samples, and sign it."""
    if allow_regression is not None and compare_to is None:
        raise click.UsageError("--allow-regression needs --compare-to")
    if allow_regression is not None and not allow_regression.strip():
        raise click.UsageError("--allow-regression needs a reason")
    config = BuildConfig(
        name=name,
        version=version,
        channel=channel,
        mode=mode,
        target=target,
        arch=tuple(arch) or None,
        policy=GatePolicy(max_abs_drop, max_rel_drop, min_agreement),
        rescue=not no_rescue,
        max_exclusions=max_exclusions,
        kll_k=kll_k,
        expires_days=expires_days,
        compare_limits=ComparisonLimits(
            max_accuracy_drop=max_accuracy_drop, max_recall_drop=max_recall_drop
        ),
        allow_regression=allow_regression,
    )
    try:
        result = run_build(
            model,
            calib_path,
            eval_path,
            contract_path,
            config,
            KeyStore.open(keystore_dir, passphrase_from_env()),
            out_dir,
            range_margin=range_margin,
            compare_to=compare_to,
        )
    except AccuracyGateError as exc:
        # The full report and the diagnosis, then the error boundary's one line and exit 5.
        if as_json:
            click.echo(json.dumps(exc.report, indent=2, default=str))
        elif exc.report:
            click.echo(render_failure(exc.report))
        raise
    except ChampionRegressionError as exc:
        # The whole report, comparison included, then the one line and exit 5 (no bundle).
        if as_json:
            click.echo(json.dumps(_without_table(exc.report), indent=2, default=str))
        elif exc.report:
            click.echo(render_table(exc.report))
        raise
    if as_json:
        click.echo(json.dumps(_without_table(result.report), indent=2, default=str))
    else:
        click.echo(result.report["table"])
        click.echo(f"bundle: {out_dir / bundle_name(result)}")


def _without_table(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "table"}


def bundle_name(result: BuildResult) -> str:
    return f"{result.manifest.name}-{result.manifest.version}.efb"


def run_build(
    model: Path,
    calib_path: Path,
    eval_path: Path,
    contract_path: Path | None,
    config: BuildConfig,
    store: KeyStore,
    out_dir: Path,
    *,
    range_margin: float = RANGE_MARGIN,
    compare_to: Path | None = None,
) -> BuildResult:
    """Load the files, build, and write ``<name>-<version>.efb`` and its report JSON.

    On an accuracy-gate failure the report JSON (with the diagnosis) is written all the same,
    and no bundle; likewise on a regression against the ``compare_to`` champion.

    Raises:
        InputDataError: unknown model format or unusable data; plus everything
            ``build_bundle`` raises.
        BundleFormatError, BundleVerificationError: ``compare_to`` is not a bundle the key
            store's root trusts.
        ChampionMismatchError: ``compare_to`` is of another model name (checked first).
    """
    champion: Champion | None = None
    if compare_to is not None:
        champion = load_champion(
            compare_to, store.trusted_root(), now=datetime.now(UTC), name=config.name
        )
    fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(model.suffix)
    if fmt is None:
        raise InputDataError(f"{model.name}: expected a .onnx or .tflite model")
    model_bytes = model.read_bytes()
    runtime = load_runtime(model_bytes, fmt)
    try:
        calib = load_dataset(calib_path, runtime.inputs)
        evaluation = load_dataset(eval_path, runtime.inputs)
        if contract_path:
            contract = load_contract(contract_path)
        else:
            contract = infer_contract(
                runtime.inputs,
                runtime.outputs,
                calib,
                range_margin=range_margin,
                labels=evaluation.labels,
                sample_outputs=run_all(
                    runtime,
                    calib.take(256),
                    {name: Preprocessing() for name in calib.inputs},
                    batch=_model_batch(runtime.inputs),
                ),
            )
            config = replace(config, contract_source="inferred")
    finally:
        runtime.close()
    click.echo(
        f"building {config.name} v{config.version} from {model.name}: "
        f"{len(calib)} calibration / {len(evaluation)} evaluation samples",
        err=True,
    )
    report_path = out_dir / f"{config.name}-{config.version}.report.json"
    try:
        result = build_bundle(
            model_bytes,
            fmt,
            calib,
            evaluation,
            contract,
            config,
            store,
            now=datetime.now(UTC),
            progress=_progress(),
            champion=champion,
        )
    except (AccuracyGateError, ChampionRegressionError) as exc:
        out_dir.mkdir(parents=True, exist_ok=True)
        report_json = json.dumps(_without_table(exc.report), indent=2, default=str)
        write_bundle(report_path, report_json.encode())
        click.echo(f"report: {report_path}", err=True)
        raise
    warning = _refusal_warning(result.report.get("contract_check"))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bundle(out_dir / bundle_name(result), result.bundle)
    write_bundle(
        report_path, json.dumps(_without_table(result.report), indent=2, default=str).encode()
    )
    return result


def _model_batch(inputs: Any) -> int:
    """64, or the model's fixed batch size when its first input has one."""
    first = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return first if isinstance(first, int) and 0 < first < 64 else 64


def _refusal_warning(check: Any) -> str | None:
    if not isinstance(check, dict) or not check.get("refused_rows"):
        return None
    return describe_refusals(
        RefusalReport(
            check["rows"], check["refused_rows"], check["by_reason"], check["by_feature"]
        ),
        str(check.get("source", "given")),
    )


@click.command()
@click.option(
    "--out",
    "out_dir",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
def demo(out_dir: Path) -> None:
    """The end-to-end example: train, quantize, gate, sign, then verify and run as a device."""
    from model_builder.examples import save_example

    out_dir.mkdir(parents=True, exist_ok=True)
    click.echo("1/6 training the digits MLP (scikit-learn bundled digits, exported to ONNX)")
    ex_dir = save_example("digits-mlp", out_dir / "example")
    keys_dir = out_dir / "keys"
    click.echo("2/6 creating a root of trust and signing keys")
    store = (
        KeyStore.open(keys_dir)
        if (keys_dir / "root.json").exists()
        else KeyStore.init(keys_dir, now=datetime.now(UTC))
    )
    version = 1 + max(
        (int(p.stem.rsplit("-", 1)[1]) for p in out_dir.glob("digits-*.efb")), default=0
    )
    click.echo(f"3/6 model-builder build (static int8, gate, baseline, sign) -> v{version}")
    result = run_build(
        ex_dir / "model.onnx",
        ex_dir / "calib.npz",
        ex_dir / "eval.npz",
        ex_dir / "contract.json",
        BuildConfig(name="digits", version=version),
        store,
        out_dir,
    )
    click.echo(result.report["table"])
    click.echo("4/6 verifying and running the bundle as a device would")
    device = detect_device_profile()
    loaded = read_bundle(
        out_dir / bundle_name(result),
        store.trusted_root(),
        now=datetime.now(UTC),
        installed_version=version - 1 or None,
        device=device,
    )
    runtime = load_runtime(loaded.artifact, loaded.manifest.artifact.format)
    try:
        golden = check_golden(loaded.manifest, runtime)
    finally:
        runtime.close()
    data = np.load(ex_dir / "eval.npz")
    click.echo(
        f"   trusted: signed by {len(loaded.verified.signed_by)} key(s) under root "
        f"v{store.trusted_root().version}; device {device.arch}, onnxruntime "
        f"{device.runtimes.get('onnxruntime')}"
    )
    click.echo(f"   golden samples: {golden.passed}/{golden.total} passed")
    click.echo(
        f"summary: digits v{version}  {result.report['float']['size_bytes']:,} -> "
        f"{result.report['quantized']['size_bytes']:,} bytes, accuracy "
        f"{result.report['float']['value']:.2%} -> {result.report['quantized']['value']:.2%}"
        f" on {len(data['y'])} held-out digits, agreement {result.report['agreement']:.2%}"
    )
    click.echo(f"bundle: {out_dir / bundle_name(result)}   root: {store.root_path}")
    if not golden.ok:
        raise InputDataError("golden samples failed on this machine: " + "; ".join(golden.failures))
