"""``--compare-to``: the new model against the signed bundle it replaces (the champion).

Owns: reading and verifying the champion bundle with the builder's trust root
(``load_champion``), refusing a champion that cannot be compared (``check_champion_fits``: another
model name, other inputs, task or labels), running both models on the evaluation set through the
gate's own measurement path (``measure.evaluate``: raw data -> each model's declared
preprocessing -> the agent's runtime adapter) and the report's ``comparison`` section
(``comparison_report``).

Does not own the comparison or the verdict: ``edge_agent.quality.compare`` (``compare_models``,
``judge``), the same code the server runs before a rollout, so both judge alike. Does not decide
what a regression leads to (``build`` raises ``ChampionRegressionError`` unless the build config
records an ``allow_regression`` reason) nor print anything (``report``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.bundle import read_bundle, sha256_file
from edge_agent.contract import BundleManifest, InputContract, OutputContract
from edge_agent.quality.compare import (
    ComparisonLimits,
    ComparisonVerdict,
    ModelComparison,
    compare_models,
    judge,
    mcnemar_z,
)
from edge_agent.runtime.base import Runtime, RuntimeOptions
from edge_agent.runtime.loader import load_runtime
from edge_agent.trust import TrustedRoot
from model_builder.data import Dataset
from model_builder.errors import ChampionMismatchError, InputDataError
from model_builder.evaluate.measure import class_indices, evaluate
from model_builder.quantize.calibration import ProgressFn

__all__ = [
    "Champion",
    "ChampionComparison",
    "check_champion_fits",
    "compare_with_champion",
    "comparison_figures",
    "comparison_report",
    "load_champion",
]

Array = npt.NDArray[Any]


@dataclass(frozen=True, eq=False)
class Champion:
    """A verified champion bundle: its manifest, its model, and the bundle file's SHA-256 (the
    digest the fleet server's registry records for a published bundle)."""

    manifest: BundleManifest
    artifact: bytes
    sha256: str

    def identity(self) -> dict[str, Any]:
        return {"name": self.manifest.name, "version": self.manifest.version, "sha256": self.sha256}


@dataclass(frozen=True)
class ChampionComparison:
    """Both models' answers compared (``comparison``) and judged (``verdict``) under ``limits``.

    ``no_answer`` counts the rows each model gave non-finite scores for (champion, challenger);
    when either is non-zero the comparison has one more class than the labels, "no answer".
    """

    comparison: ModelComparison
    verdict: ComparisonVerdict
    limits: ComparisonLimits
    no_answer: tuple[int, int] = (0, 0)


def load_champion(path: Path, root: TrustedRoot, *, now: datetime, name: str) -> Champion:
    """Read ``path`` and verify it as ``model-builder verify`` does, then check its name.

    Raises:
        BundleFormatError: not a readable bundle.
        BundleVerificationError: not trusted by ``root`` (tampered, unknown signer, expired).
        ChampionMismatchError: a trusted bundle of another model name than ``name``.
        OSError: the file cannot be read.
    """
    digest = sha256_file(Path(path))  # the file as given, as the registry names bundles
    loaded = read_bundle(Path(path), root, now=now, installed_version=None, device=None)
    m = loaded.manifest
    if m.name != name:
        raise ChampionMismatchError(
            f"--compare-to {Path(path).name} is {m.name} v{m.version}, not a version of {name}"
        )
    return Champion(m, loaded.artifact, digest)


def check_champion_fits(
    champion: BundleManifest, inputs: InputContract, outputs: OutputContract
) -> None:
    """Can the champion be run on the new model's evaluation data and its answers compared? Pure.

    Both must be classifiers over the same labels in the same order (a class index must mean
    the same class), and take the same raw inputs: the same input names, ranks and fixed
    per-sample dimensions (each model applies its own declared preprocessing).

    Raises:
        ChampionMismatchError: the first difference, in one line.
    """
    who = f"champion {champion.name} v{champion.version}"
    if outputs.task != "classification" or champion.outputs.task != "classification":
        raise ChampionMismatchError(
            f"--compare-to compares classifiers; the new model is a {outputs.task} model and "
            f"the {who} a {champion.outputs.task} model"
        )
    if champion.outputs.labels != outputs.labels:
        raise ChampionMismatchError(
            f"the {who} has labels {list(champion.outputs.labels)[:12]}, the new model "
            f"{list(outputs.labels)[:12]}: class indices would not mean the same classes"
        )
    theirs = {t.name: _sample_shape(t.shape) for t in champion.inputs.tensors}
    ours = {t.name: _sample_shape(t.shape) for t in inputs.tensors}
    if set(theirs) != set(ours):
        raise ChampionMismatchError(
            f"the {who} takes inputs {sorted(theirs)}, the new model {sorted(ours)}"
        )
    for name, shape in ours.items():
        if theirs[name] != shape:
            raise ChampionMismatchError(
                f"input {name!r}: the {who} takes samples shaped {_shape_text(theirs[name])}, "
                f"the new model {_shape_text(shape)}"
            )


def compare_with_champion(
    champion: Champion,
    challenger: Runtime,
    challenger_inputs: InputContract,
    challenger_outputs: OutputContract,
    evaluation: Dataset,
    limits: ComparisonLimits,
    *,
    progress: ProgressFn | None = None,
) -> ChampionComparison:
    """Run the champion's model and ``challenger`` on ``evaluation`` and judge the difference.

    Each model reads the same raw samples through its own declared preprocessing, exactly as
    the accuracy gate measures (``measure.evaluate``).

    Raises:
        ChampionMismatchError: see ``check_champion_fits``.
        InputDataError: the evaluation data has no labels or does not fit a model.
        ModelLoadError: the champion's runtime rejected its model.
        InferenceError: a model failed on a batch.
    """
    if evaluation.labels is None:
        raise InputDataError("--compare-to needs labelled evaluation data (y)")
    check_champion_fits(champion.manifest, challenger_inputs, challenger_outputs)
    x = dict(evaluation.inputs)
    y = evaluation.labels
    runtime = load_runtime(
        champion.artifact, champion.manifest.artifact.format, RuntimeOptions(warmup_runs=1)
    )
    try:
        old = evaluate(
            runtime,
            x,
            y,
            _preprocessing(champion.manifest.inputs),
            champion.manifest.outputs,
            progress=progress,
        )
    finally:
        runtime.close()
    new = evaluate(
        challenger,
        x,
        y,
        _preprocessing(challenger_inputs),
        challenger_outputs,
        progress=progress,
    )
    truth = class_indices(y, challenger_outputs.labels)
    k = len(challenger_outputs.labels)
    a, b = np.asarray(old.predictions), np.asarray(new.predictions)
    missing = (int((a < 0).sum()), int((b < 0).sum()))
    if any(missing):
        # Non-finite scores are wrong answers (as the gate counts them): an extra class keeps
        # them visible in the matrices instead of inventing which class they were.
        a, b, k = np.where(a < 0, k, a), np.where(b < 0, k, b), k + 1
    comparison = compare_models(truth, a, b, k)
    verdict = judge(comparison, limits)
    if any(missing):
        note = (
            f"class {k - 1} stands for no answer (non-finite scores): champion {missing[0]}, "
            f"challenger {missing[1]} rows"
        )
        verdict = ComparisonVerdict(verdict.regressed, verdict.reasons, (*verdict.notes, note))
    return ChampionComparison(comparison, verdict, limits, missing)


def comparison_report(
    champion: Champion, result: ChampionComparison, allowed_regression: str | None
) -> dict[str, Any]:
    """The build report's ``comparison`` section. Pure.

    ``champion_bundle`` (name, version, bundle file SHA-256), ``limits``, ``verdict``
    (regressed, reasons, notes), ``allowed_regression`` (the recorded reason, or None), both
    accuracies and the McNemar z for reading without recomputing, and the figures of
    ``ModelComparison.to_dict`` at the same level (``n``, the ``champion`` and ``challenger``
    confusion matrices, the matrix ``between`` the two models' answers, the discordant counts
    overall and by class): ``ModelComparison.from_dict`` reads them back from those keys. The
    bundle's identity is not under ``champion``, which ``to_dict`` uses for the matrix.
    """
    c, v = result.comparison, result.verdict
    return {
        "champion_bundle": champion.identity(),
        "limits": asdict(result.limits),
        "verdict": {"regressed": v.regressed, "reasons": list(v.reasons), "notes": list(v.notes)},
        "allowed_regression": allowed_regression,
        "champion_accuracy": c.champion.accuracy(),
        "challenger_accuracy": c.challenger.accuracy(),
        "mcnemar_z": mcnemar_z(c.champion_only, c.challenger_only),
        **c.to_dict(),
    }


#: The keys of ``ModelComparison.to_dict`` inside the report's ``comparison`` section.
_FIGURES = (
    "n",
    "champion",
    "challenger",
    "between",
    "champion_only",
    "challenger_only",
    "champion_only_by_class",
    "challenger_only_by_class",
)


def comparison_figures(section: Mapping[str, Any]) -> ModelComparison:
    """The ``ModelComparison`` inside a report's ``comparison`` section. Pure.

    Raises:
        ContractError: the figures are missing or do not add up.
    """
    return ModelComparison.from_dict({k: section.get(k) for k in _FIGURES})


def _preprocessing(inputs: InputContract) -> Mapping[str, Any]:
    return {t.name: t.preprocessing for t in inputs.tensors}


def _sample_shape(shape: Any) -> tuple[int | None, ...]:
    return tuple(d.size for d in shape[1:])


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
