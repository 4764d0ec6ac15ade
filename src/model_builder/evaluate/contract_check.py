"""Does the input/output contract fit the model, and what would it refuse of the held-out data?

Owns: the pure structural comparison of a contract (given or inferred) with the model's I/O as
the runtime adapter reports it (names, rank, fixed dimensions, dtypes, preprocessing and range
sizes, output names, class count), and the check of a contract against evaluation data with the
agent's own ``Validator``: how many held-out rows it would refuse, by reason and by feature.
Does not own: reading files, inferring contracts (``data``) or running models.

A contract that does not fit its model used to surface as a ``KeyError`` deep inside the accuracy
gate, or worse, as a bundle that every device refuses at its first request. Checking up front
turns each mismatch into one :class:`ContractMismatchError` line naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract import InputContract, OutputContract, TensorSpec
from edge_agent.contract.validation import Validator
from edge_agent.errors import InputValidationError
from edge_agent.runtime.base import TensorInfo
from model_builder.errors import ContractMismatchError, InputDataError

Array = npt.NDArray[Any]
_FLOAT_KINDS = frozenset("f")
_INT_KINDS = frozenset("iu")


def check_contract_fits_model(
    inputs: InputContract,
    outputs: OutputContract,
    model_inputs: Sequence[TensorInfo],
    model_outputs: Sequence[TensorInfo],
) -> None:
    """Refuse a contract the model cannot serve. Pure.

    Raises:
        ContractMismatchError: an input or output name the model lacks (or a model input the
            contract lacks), a rank or fixed dimension that differs, a raw dtype that cannot
            become the model's dtype, preprocessing or ranges with the wrong number of values,
            or a class count that differs from the score output's width.
    """
    by_name = {i.name: i for i in model_inputs}
    names = [t.name for t in inputs.tensors]
    missing = [n for n in by_name if n not in names]
    unknown = [n for n in names if n not in by_name]
    if missing or unknown:
        raise ContractMismatchError(
            f"contract inputs {names} do not match the model's inputs {list(by_name)}"
            + (f": unknown {unknown}" if unknown else "")
            + (f": missing {missing}" if missing else "")
        )
    for spec in inputs.tensors:
        _check_input(spec, by_name[spec.name])
    out_by_name = {o.name: o for o in model_outputs}
    unknown_out = [n for n in outputs.outputs if n not in out_by_name]
    if unknown_out:
        raise ContractMismatchError(
            f"contract outputs {unknown_out} are not outputs of the model; it has "
            f"{list(out_by_name)}"
        )
    score = outputs.score_output
    if score is not None and score not in out_by_name:
        raise ContractMismatchError(
            f"score_output {score!r} is not an output of the model; it has {list(out_by_name)}"
        )
    if outputs.task == "classification" and score is not None:
        info = out_by_name[score]
        width = _per_sample_size(info.shape)
        if width is not None and width != len(outputs.labels):
            raise ContractMismatchError(
                f"score_output {score!r} has {width} values per sample but the contract names "
                f"{len(outputs.labels)} labels"
            )
        if not info.dtype.startswith("float"):
            raise ContractMismatchError(
                f"score_output {score!r} is {info.dtype}; classification needs float scores"
            )


def _check_input(spec: TensorSpec, info: TensorInfo) -> None:
    name = spec.name
    if len(spec.shape) != len(info.shape):
        raise ContractMismatchError(
            f"input {name!r}: the contract has rank {len(spec.shape)}, the model "
            f"{len(info.shape)} {_shape_text(info.shape)}"
        )
    model_batch = info.shape[0] if info.shape else None
    if isinstance(model_batch, int) and model_batch > 0 and spec.shape[0].max > model_batch:
        raise ContractMismatchError(
            f"input {name!r}: the contract allows batches up to {spec.shape[0].max}, the model "
            f"takes exactly {model_batch}"
        )
    for axis, (dim, want) in enumerate(zip(spec.shape, info.shape, strict=True)):
        if axis == 0 or not isinstance(want, int) or want <= 0:
            continue
        if dim.min != want or dim.max != want:
            got = dim.size if dim.size is not None else f"{dim.min}..{dim.max}"
            raise ContractMismatchError(
                f"input {name!r}: dimension {axis} is {got} in the contract, {want} in the "
                f"model {_shape_text(info.shape)}"
            )
    raw, model = np.dtype(spec.dtype), np.dtype(info.dtype)
    identity = spec.preprocessing.kind == "identity"
    fits = (
        (model.kind in _FLOAT_KINDS and raw.kind in "fiu")
        or (model.kind in _INT_KINDS and raw.kind in _INT_KINDS and identity)
        or (model.kind == "b" and raw.kind == "b")
    )
    if not fits:
        raise ContractMismatchError(
            f"input {name!r}: raw dtype {spec.dtype} (preprocessing {spec.preprocessing.kind}) "
            f"cannot feed the model's {info.dtype} input"
        )
    features = _per_sample_size(tuple(d.size for d in spec.shape))
    if features is None:
        return
    pre = spec.preprocessing
    for label, values in (("scale", pre.scale), ("offset", pre.offset)):
        if values and len(values) not in (1, features):
            raise ContractMismatchError(
                f"input {name!r}: preprocessing {label} has {len(values)} values for "
                f"{features} features"
            )
    if spec.ranges is not None and len(spec.ranges.low) not in (1, features):
        raise ContractMismatchError(
            f"input {name!r}: ranges have {len(spec.ranges.low)} values for {features} features"
        )


def _per_sample_size(shape: Sequence[int | str | None]) -> int | None:
    """Values per sample when every non-batch dimension is fixed, else None."""
    dims = list(shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return int(np.prod([int(d) for d in dims if isinstance(d, int)], dtype=np.int64))


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) or d < 0 else str(d) for d in shape) + "]"


# ------------------------------------------------------------------- against held-out data
@dataclass(frozen=True)
class RefusalReport:
    """What a contract would refuse of a dataset, row by row, as the device would count it."""

    rows: int
    refused_rows: int
    by_reason: Mapping[str, int]
    by_feature: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def refused_fraction(self) -> float:
        return self.refused_rows / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "refused_rows": self.refused_rows,
            "refused_fraction": round(self.refused_fraction, 6),
            "by_reason": dict(self.by_reason),
            "by_feature": {k: dict(v) for k, v in self.by_feature.items()},
        }


def refusals(contract: InputContract, data: Mapping[str, Array], top: int = 10) -> RefusalReport:
    """Run ``data`` (raw inputs by name) through the agent's ``Validator`` for ``contract``.

    Rows go through in batches the contract allows; rows the device would refuse are counted by
    reason (``nan``, ``inf``, ``out_of_range``), and out-of-range rows by feature (the ``top``
    features refusing most rows, as ``"<input>[<flat index>]"`` with how many rows fell below
    and above the range).

    Raises:
        ContractMismatchError: the data does not fit the contract structurally (missing input,
            rank, shape or dtype): no device would accept any of it.
    """
    validator = Validator(contract, policy="drop")
    n = len(next(iter(data.values())))
    step = max(1, min(tensor.shape[0].max for tensor in contract.tensors))
    by_reason: dict[str, int] = {}
    refused = 0
    # A data file's dtype is incidental (np.savez keeps float64): send what an application
    # would, the contract's dtype, where that cast keeps the kind (float -> float, int -> float).
    dtypes = {t.name: np.dtype(t.dtype) for t in contract.tensors}
    data = {
        k: v.astype(dtypes[k])
        if k in dtypes and np.can_cast(v.dtype, dtypes[k], "same_kind")
        else v
        for k, v in ((k, np.asarray(v)) for k, v in data.items())
    }
    for start in range(0, n, step):
        batch = {k: v[start : start + step] for k, v in data.items()}
        try:
            result = validator.validate(batch)
        except InputValidationError as exc:
            if not exc.counts:  # structural: the data does not fit the contract at all
                raise ContractMismatchError(
                    f"the evaluation data does not fit the contract: {exc}"
                ) from exc
            # every row of the batch bad under the drop policy
            counts: Mapping[str, int] = exc.counts
            dropped = len(next(iter(batch.values())))
        else:
            counts, dropped = result.rejected, result.dropped
        refused += dropped
        for reason, count in counts.items():
            by_reason[reason] = by_reason.get(reason, 0) + int(count)
    return RefusalReport(n, refused, by_reason, _by_feature(contract, data, top))


def _by_feature(
    contract: InputContract, data: Mapping[str, Array], top: int
) -> dict[str, dict[str, int]]:
    rows: list[tuple[str, int, int]] = []
    for spec in contract.tensors:
        if spec.ranges is None or spec.name not in data:
            continue
        x = np.asarray(data[spec.name], dtype=np.float64)
        flat = x.reshape(len(x), -1)
        lo = np.asarray(spec.ranges.low, dtype=np.float64)
        hi = np.asarray(spec.ranges.high, dtype=np.float64)
        if lo.size not in (1, flat.shape[1]):
            continue
        finite = np.isfinite(flat)
        below = ((flat < lo) & finite).sum(axis=0)
        above = ((flat > hi) & finite).sum(axis=0)
        for j in np.flatnonzero(below + above):
            rows.append((f"{spec.name}[{int(j)}]", int(below[j]), int(above[j])))
    rows.sort(key=lambda r: -(r[1] + r[2]))
    return {name: {"below": b, "above": a} for name, b, a in rows[:top]}


def describe_refusals(report: RefusalReport, source: str) -> str | None:
    """One warning line when the contract refuses held-out rows, else None."""
    if not report.refused_rows:
        return None
    features = ", ".join(
        f"{k} ({v['below']} below, {v['above']} above)" for k, v in report.by_feature.items()
    )
    reasons = ", ".join(f"{k}={v}" for k, v in report.by_reason.items())
    return (
        f"the {source} contract would refuse {report.refused_rows} of {report.rows} evaluation "
        f"rows ({report.refused_fraction:.1%}: {reasons})"
        + (f"; out of range: {features}" if features else "")
    )


def check_data_fits(data: Mapping[str, Array], what: str) -> None:
    """Numeric arrays only: strings, objects and complex numbers are no model input.

    Raises:
        InputDataError: a non-numeric array.
    """
    for name, arr in data.items():
        if np.asarray(arr).dtype.kind not in "fiub":
            raise InputDataError(
                f"{what} input {name!r} has dtype {np.asarray(arr).dtype}; expected numbers"
            )
