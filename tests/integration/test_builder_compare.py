"""``model-builder build --compare-to``: the new model against the signed bundle it replaces.

Real models (the digits MLP, and the same MLP retrained with 90% of its 3s labelled 8: a
confidently wrong challenger), real onnxruntime, real Ed25519 keys. Library calls for the
outcomes, ``CliRunner`` for the command's exit codes and files, and one real subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from edge_agent.bundle import read_bundle
from edge_agent.contract import BundleManifest
from edge_agent.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_UNTRUSTED,
    DigestMismatchError,
    SignatureThresholdError,
)
from edge_agent.trust import TrustedRoot
from model_builder import cli as builder_cli
from model_builder.build import BuildResult, build_bundle
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.errors import ChampionMismatchError, ChampionRegressionError
from model_builder.evaluate.compare import Champion, comparison_figures, load_champion
from model_builder.evaluate.report import render_table
from model_builder.examples import (
    ExampleModel,
    digits_mislabelled_mlp,
    digits_mlp,
    save_example,
)
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle
from support import build_argv, members, repack

COMPAT = Path(__file__).parents[1] / "compat" / "v1-2026-11"


def _build(
    ex: ExampleModel,
    keys: KeyStore,
    version: int,
    champion: Champion | None = None,
    **config: object,
) -> BuildResult:
    return build_bundle(
        ex.model_bytes,
        "onnx",
        Dataset({ex.input_name: ex.x_calib}, None),
        Dataset({ex.input_name: ex.x_eval}, ex.y_eval),
        (ex.input_contract(), ex.output_contract()),
        BuildConfig(name="digits", version=version, measure_latency=False, **config),  # type: ignore[arg-type]
        keys,
        now=datetime.now(UTC),
        champion=champion,
    )


@dataclasses.dataclass(frozen=True)
class Ws:
    dir: Path
    keys: KeyStore
    champion_path: Path  # digits v1, the good model

    def champion(self, path: Path | None = None, name: str = "digits") -> Champion:
        return load_champion(
            path or self.champion_path, self.keys.trusted_root(), now=datetime.now(UTC), name=name
        )


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Ws:
    root = tmp_path_factory.mktemp("compare")
    keys = KeyStore.init(root / "keys", now=datetime.now(UTC))
    path = root / "digits-1.efb"
    path.write_bytes(_build(digits_mlp(), keys, 1).bundle)
    return Ws(root, keys, path)


@pytest.fixture(scope="module")
def wrong() -> ExampleModel:
    return digits_mislabelled_mlp()


def _verified_report(bundle: bytes, keys: KeyStore, tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "built.efb"
    path.write_bytes(bundle)
    loaded = read_bundle(
        path, keys.trusted_root(), now=datetime.now(UTC), installed_version=None, device=None
    )
    return dict(loaded.manifest.report)


# --------------------------------------------------------------------------------- outcomes
def test_a_confidently_wrong_challenger_is_refused_naming_the_class_flip(
    ws: Ws, wrong: ExampleModel
) -> None:
    good = digits_mlp()
    # confidently wrong: 5-10 points less accurate, not less confident, same inputs
    assert 0.05 <= good.reference_accuracy - wrong.reference_accuracy <= 0.10
    assert wrong.reference_eval_proba.max(axis=1).mean() >= (
        good.reference_eval_proba.max(axis=1).mean()
    )
    with pytest.raises(ChampionRegressionError) as caught:
        _build(wrong, ws.keys, 2, ws.champion())
    exc = caught.value
    assert "digits v1" in str(exc)
    assert "--allow-regression" in str(exc)
    assert "class 3 recall" in str(exc)
    assert "as class 8" in str(exc)
    section = exc.report["comparison"]
    assert section["verdict"]["regressed"] is True
    assert section["allowed_regression"] is None
    figures = comparison_figures(section)
    assert (figures.challenger.recall(3) or 0.0) < 0.2
    assert (figures.champion.recall(3) or 0.0) > 0.9
    assert figures.challenger.flips(top=1)[0][:2] == (3, 8)
    # the gate against its own float model passed: only the comparison refused it
    assert exc.report["gate"]["passed"] is True
    table = exc.report["table"]
    assert "comparison: REGRESSED" in table
    assert "class 3 recall" in table
    assert "now predicted as 8" in table


def test_the_same_model_against_itself_passes_and_the_signed_report_carries_it(
    ws: Ws, tmp_path: Path
) -> None:
    champion = ws.champion()
    result = _build(digits_mlp(), ws.keys, 2, champion)
    report = _verified_report(result.bundle, ws.keys, tmp_path)
    section = report["comparison"]
    assert isinstance(section, dict)
    assert section["champion_bundle"] == {
        "name": "digits",
        "version": 1,
        "sha256": champion.sha256,
    }
    assert section["verdict"] == {"regressed": False, "reasons": [], "notes": []}
    assert section["limits"]["max_accuracy_drop"] == 0.01
    assert section["limits"]["max_recall_drop"] == 0.05
    figures = comparison_figures(section)
    assert figures.n == 450
    assert figures.champion_only == figures.challenger_only == 0
    assert figures.disagreement == 0.0
    assert section["champion_accuracy"] == section["challenger_accuracy"] > 0.95
    assert "comparison: no regression" in str(report["table"])
    # the builder's own figures are those of a build without --compare-to
    plain = _build(digits_mlp(), ws.keys, 2).report
    assert "comparison" not in plain
    keep = ("float", "quantized", "agreement", "gate", "metric", "eval_samples")
    assert {k: report[k] for k in keep} == {k: plain[k] for k in keep}


def test_allow_regression_signs_it_with_the_reason(
    ws: Ws, wrong: ExampleModel, tmp_path: Path
) -> None:
    result = _build(wrong, ws.keys, 2, ws.champion(), allow_regression="label fix pending")
    section = _verified_report(result.bundle, ws.keys, tmp_path)["comparison"]
    assert isinstance(section, dict)
    assert section["verdict"]["regressed"] is True
    assert section["allowed_regression"] == "label fix pending"
    assert "REGRESSED (allowed: label fix pending)" in result.report["table"]


def test_tighter_limits_are_recorded_and_looser_ones_let_it_pass(
    ws: Ws, wrong: ExampleModel
) -> None:
    from edge_agent.quality.compare import ComparisonLimits

    loose = ComparisonLimits(max_accuracy_drop=0.2, max_recall_drop=1.0)
    result = _build(wrong, ws.keys, 2, ws.champion(), compare_limits=loose)
    section = result.report["comparison"]
    assert section["verdict"]["regressed"] is False
    assert section["limits"]["max_recall_drop"] == 1.0


def test_a_champion_of_another_name_is_refused(ws: Ws, tmp_path: Path) -> None:
    with pytest.raises(ChampionMismatchError, match="not a version of other"):
        ws.champion(name="other")
    # a trusted bundle named "other" given to a "digits" build
    loaded = read_bundle(
        ws.champion_path,
        ws.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    other = dataclasses.replace(loaded.manifest, name="other")
    path = tmp_path / "other-1.efb"
    path.write_bytes(package_bundle(other, loaded.artifact, ws.keys, now=datetime.now(UTC)))
    with pytest.raises(ChampionMismatchError, match="is other v1, not a version of digits"):
        ws.champion(path)


def test_a_champion_with_other_labels_or_inputs_is_refused_before_quantizing(ws: Ws) -> None:
    champion = ws.champion()
    ex = digits_mlp()
    m = champion.manifest
    relabelled = dataclasses.replace(
        m, outputs=dataclasses.replace(m.outputs, labels=tuple("abcdefghij"))
    )
    with pytest.raises(ChampionMismatchError, match="labels"):
        _build(ex, ws.keys, 2, dataclasses.replace(champion, manifest=relabelled))
    spec = m.inputs.tensors[0]
    renamed = dataclasses.replace(
        m, inputs=dataclasses.replace(m.inputs, tensors=(dataclasses.replace(spec, name="x"),))
    )
    with pytest.raises(ChampionMismatchError, match="inputs"):
        _build(ex, ws.keys, 2, dataclasses.replace(champion, manifest=renamed))


def test_a_tampered_or_foreign_champion_is_untrusted(ws: Ws, tmp_path: Path) -> None:
    parts = members(ws.champion_path.read_bytes())
    art = bytearray(parts["model.onnx"])
    art[-1] ^= 0xFF
    parts["model.onnx"] = bytes(art)
    tampered = tmp_path / "tampered.efb"
    tampered.write_bytes(repack(parts))
    with pytest.raises(DigestMismatchError):
        ws.champion(tampered)
    stranger = KeyStore.init(tmp_path / "stranger", now=datetime.now(UTC))
    foreign = tmp_path / "foreign.efb"
    foreign.write_bytes(_build(digits_mlp(), stranger, 1).bundle)
    with pytest.raises(SignatureThresholdError):
        ws.champion(foreign)


def test_a_released_bundle_without_a_comparison_can_be_the_champion(ws: Ws) -> None:
    """The v1 compat fixture (a report with no ``comparison``) is a champion like any other."""
    info = json.loads((COMPAT / "fixture.json").read_text())
    old = load_champion(
        COMPAT / info["bundle"],
        TrustedRoot.from_bytes((COMPAT / "root.json").read_bytes()),
        now=datetime.fromisoformat(info["verify_at"]),
        name="digits",
    )
    assert "comparison" not in old.manifest.report
    render_table(old.manifest.report)  # an old report still renders
    result = _build(digits_mlp(), ws.keys, 2, old)
    assert result.report["comparison"]["champion_bundle"]["version"] == 1
    assert result.report["comparison"]["n"] == 450


# ------------------------------------------------------------------------------------- CLI
def run(args: list[str], entry: Callable[[list[str]], None] = builder_cli.main) -> Result:
    """Through ``main``, so the error boundary and its exit codes are what is tested."""

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
def cli_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare-cli")
    save_example("digits-mlp", root / "good")
    save_example("digits-mislabelled-mlp", root / "wrong")
    assert run(["keys", "init", str(root / "keys")]).exit_code == 0
    first = run(build_argv(root / "good", keys=root / "keys", out=root / "out", version=1))
    assert first.exit_code == 0, first.output
    return root


def test_cli_refuses_the_regression_writes_the_report_and_no_bundle(cli_ws: Path) -> None:
    out = cli_ws / "out"
    res = run(
        [
            *build_argv(cli_ws / "wrong", keys=cli_ws / "keys", out=out, version=2),
            "--compare-to",
            str(out / "digits-1.efb"),
        ]
    )
    assert res.exit_code == EXIT_GATE, res.output
    assert res.output.strip().splitlines()[-1].startswith("error[champion_regression]")
    assert "now predicted as 8" in res.output
    assert not (out / "digits-2.efb").exists()
    report = json.loads((out / "digits-2.report.json").read_text())
    assert report["comparison"]["verdict"]["regressed"] is True
    assert "table" not in report


def test_cli_refusals_of_the_champion_are_one_typed_line(cli_ws: Path, tmp_path: Path) -> None:
    out = cli_ws / "out"
    argv = build_argv(cli_ws / "good", keys=cli_ws / "keys", out=tmp_path, version=2)
    renamed = [*argv[: argv.index("--name") + 1], "other", *argv[argv.index("--name") + 2 :]]
    res = run([*renamed, "--compare-to", str(out / "digits-1.efb")])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert res.output.strip().splitlines()[-1].startswith("error[champion_mismatch]")
    parts = members((out / "digits-1.efb").read_bytes())
    manifest = BundleManifest.from_bytes(parts["manifest.json"])
    parts["manifest.json"] = dataclasses.replace(manifest, version=9).to_bytes()
    tampered = tmp_path / "tampered.efb"
    tampered.write_bytes(repack(parts))
    res = run([*argv, "--compare-to", str(tampered)])
    assert res.exit_code == EXIT_UNTRUSTED, res.output
    assert res.output.strip().splitlines()[-1].startswith("error[")
    res = run([*argv, "--allow-regression", "why"])
    assert res.exit_code == 2  # a usage error: nothing to allow without --compare-to
    assert not list(tmp_path.glob("digits-2*"))


def test_cli_as_a_subprocess_compares_and_signs(cli_ws: Path, tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    out = cli_ws / "out"
    argv = build_argv(cli_ws / "wrong", keys=cli_ws / "keys", out=tmp_path, version=3)
    proc = subprocess.run(
        [
            str(bindir / "model-builder"),
            *argv,
            "--compare-to",
            str(out / "digits-1.efb"),
            "--allow-regression",
            "known label bug, shipping to the lab only",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "comparison: REGRESSED (allowed: known label bug" in proc.stdout
    verify = run(
        ["verify", str(tmp_path / "digits-3.efb"), "--keystore", str(cli_ws / "keys"), "--json"]
    )
    assert verify.exit_code == 0, verify.output
    loaded = read_bundle(
        tmp_path / "digits-3.efb",
        KeyStore.open(cli_ws / "keys").trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    section = loaded.manifest.report["comparison"]
    assert section["allowed_regression"] == "known label bug, shipping to the lab only"
    assert section["verdict"]["regressed"] is True
    assert any("class 3" in r for r in section["verdict"]["reasons"])
