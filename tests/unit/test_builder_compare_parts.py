"""The pure parts of ``--compare-to``: the champion-fits check and the comparison's table.

The running part (real models, real bundles, the CLI) is
``tests/integration/test_builder_compare.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytest

from edge_agent.contract import DimSpec, InputContract, OutputContract
from edge_agent.errors import ContractError
from edge_agent.quality.compare import ComparisonLimits, compare_models, judge, mcnemar_z
from model_builder.errors import ChampionMismatchError
from model_builder.evaluate.compare import check_champion_fits, comparison_figures
from model_builder.evaluate.report import render_comparison
from model_builder.examples import digits_mlp


@dataclass(frozen=True)
class _Manifest:
    """The four manifest fields ``check_champion_fits`` reads."""

    name: str
    version: int
    inputs: InputContract
    outputs: OutputContract


@pytest.fixture(scope="module")
def contract() -> tuple[InputContract, OutputContract]:
    ex = digits_mlp()
    return ex.input_contract(), ex.output_contract()


def _champion(inputs: InputContract, outputs: OutputContract) -> Any:
    return _Manifest("digits", 1, inputs, outputs)


def test_the_same_contract_fits(contract: tuple[InputContract, OutputContract]) -> None:
    inputs, outputs = contract
    check_champion_fits(_champion(inputs, outputs), inputs, outputs)
    # another preprocessing or batch limit still fits: each model applies its own
    spec = inputs.tensors[0]
    other = InputContract(
        (dataclasses.replace(spec, shape=(DimSpec(None, 1, 8, "batch"), *spec.shape[1:])),)
    )
    check_champion_fits(_champion(other, outputs), inputs, outputs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("labels", "labels"),
        ("order", "labels"),
        ("task", "compares classifiers"),
        ("input name", "takes inputs"),
        ("sample shape", r"samples shaped \[32\]"),
    ],
)
def test_a_champion_that_cannot_be_compared_is_refused(
    contract: tuple[InputContract, OutputContract], change: str, match: str
) -> None:
    inputs, outputs = contract
    spec = inputs.tensors[0]
    theirs_in, theirs_out = inputs, outputs
    if change == "labels":
        theirs_out = dataclasses.replace(outputs, labels=(*outputs.labels[:9], "ten"))
    elif change == "order":
        theirs_out = dataclasses.replace(outputs, labels=tuple(reversed(outputs.labels)))
    elif change == "task":
        theirs_out = OutputContract("regression", ("value",))
    elif change == "input name":
        theirs_in = InputContract((dataclasses.replace(spec, name="pixels"),))
    else:
        shape = (spec.shape[0], DimSpec(32))
        theirs_in = InputContract((dataclasses.replace(spec, shape=shape, ranges=None),))
    with pytest.raises(ChampionMismatchError, match=match):
        check_champion_fits(_champion(theirs_in, theirs_out), inputs, outputs)


def _section(truth: list[int], old: list[int], new: list[int], k: int) -> dict[str, Any]:
    c = compare_models(truth, old, new, k)
    limits = ComparisonLimits(min_samples=10, min_class_samples=5)
    v = judge(c, limits)
    return {
        "champion_bundle": {"name": "digits", "version": 1, "sha256": "ab" * 32},
        "limits": asdict(limits),
        "verdict": {"regressed": v.regressed, "reasons": list(v.reasons), "notes": list(v.notes)},
        "allowed_regression": None,
        "champion_accuracy": c.champion.accuracy(),
        "challenger_accuracy": c.challenger.accuracy(),
        "mcnemar_z": mcnemar_z(c.champion_only, c.challenger_only),
        **c.to_dict(),
    }


def test_the_table_names_the_regressed_class_and_where_it_flips() -> None:
    truth = [0] * 30 + [1] * 30 + [2] * 30
    old = list(truth)
    new = [0] * 30 + [2] * 25 + [1] * 5 + [2] * 30  # class 1 now mostly answered as 2
    section = _section(truth, old, new, 3)
    lines = render_comparison(section)
    text = "\n".join(lines)
    assert lines[0].startswith("compared with digits v1 (bundle sha256 abababababab)")
    assert "on 90 labelled samples" in lines[0]
    assert "100.00%      72.22%" in text
    row = next(line for line in lines if line.startswith("class 1 recall"))
    assert "16.67%" in row
    assert row.endswith("now predicted as 2 (25)")
    assert not any(line.startswith(("class 0 recall", "class 2 recall")) for line in lines)
    assert "comparison: REGRESSED (limits:" in text
    assert any(line.startswith("regression: class 1 recall") for line in lines)


def test_the_table_of_an_equal_model_and_of_an_allowed_regression() -> None:
    truth = [0] * 30 + [1] * 30
    same = _section(truth, truth, truth, 2)
    text = "\n".join(render_comparison(same))
    assert "comparison: no regression" in text
    assert "recall" not in text.split("comparison:")[0]
    worse = _section(truth, truth, [0] * 60, 2)
    worse["allowed_regression"] = "lab only"
    assert "REGRESSED (allowed: lab only)" in "\n".join(render_comparison(worse))


def test_the_figures_read_back_strictly() -> None:
    truth = np.array([0, 1, 1, 0])
    section = _section(list(truth), [0, 1, 1, 0], [0, 0, 1, 0], 2)
    assert comparison_figures(section).champion_only == 1
    broken = {**section, "champion_only": 2}
    with pytest.raises(ContractError):
        comparison_figures(broken)
