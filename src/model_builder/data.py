"""Calibration and evaluation data, and the input/output contract file.

Owns: loading datasets from ``.npz`` / ``.npy`` / ``.csv`` into named input arrays plus labels,
loading a contract file (JSON or TOML, the manifest's ``inputs``/``outputs`` form), and inferring
a contract from the model and the data when no file is given. Does not own: preprocessing
semantics (``edge_agent.contract.Preprocessing``) or quantization.

Dataset conventions:
    .npz  one array per model input, keyed by input name (a single-input model may use ``x``);
          labels under ``y`` (or ``labels``).
    .npy  a single-input model's inputs; no labels (calibration only).
    .csv  one row per sample, numeric columns; the label column is ``label`` (or ``y``) when
          present in the header; other columns are the flattened sample in order.
"""

from __future__ import annotations

import csv
import json
import tomllib
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract import (
    DimSpec,
    FeatureRanges,
    InputContract,
    OutputContract,
    TensorSpec,
)
from edge_agent.errors import ContractError
from edge_agent.runtime.base import TensorInfo
from model_builder.errors import InputDataError

_LABEL_KEYS = ("y", "labels", "label")
# How far inferred ranges reach past the calibration data, in units of a feature's span. With
# 0.1 (the old value) 2-6% of held-out rows of scikit-learn's breast-cancer, wine and digits sets
# fell outside; with 0.5 and the median-span floor at most ~1% (docs/model-builder.md).
RANGE_MARGIN = 0.5
PROBABILITY_SUM_TOL = 1e-3


@dataclass(frozen=True)
class Dataset:
    """Raw (un-preprocessed) inputs by name, and labels when known."""

    inputs: Mapping[str, npt.NDArray[Any]]
    labels: npt.NDArray[Any] | None

    def __post_init__(self) -> None:
        sizes = {len(v) for v in self.inputs.values()}
        if self.labels is not None:
            sizes.add(len(self.labels))
        if len(sizes) != 1:
            raise InputDataError(f"inputs and labels disagree on the number of samples: {sizes}")
        if not self.inputs or next(iter(sizes)) == 0:
            raise InputDataError("dataset is empty")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        return Dataset(
            {k: v[:n] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:n],
        )


def load_dataset(path: Path, inputs: Sequence[TensorInfo]) -> Dataset:
    """Load a dataset for a model with ``inputs``.

    Raises:
        InputDataError: unreadable file, unknown suffix, missing inputs, wrong sample shape.
    """
    path = Path(path)
    names = [i.name for i in inputs]
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            labels = next((arrays.pop(k) for k in _LABEL_KEYS if k in arrays), None)
            if len(names) == 1 and names[0] not in arrays:
                alias = next((k for k in ("x", "X", "inputs") if k in arrays), None)
                if alias is not None:
                    arrays[names[0]] = arrays.pop(alias)
            missing = [n for n in names if n not in arrays]
            if missing:
                raise InputDataError(
                    f"{path} lacks arrays for inputs {missing}; it has {sorted(arrays)}"
                )
            data = {n: arrays[n] for n in names}
        elif path.suffix == ".npy":
            if len(names) != 1:
                raise InputDataError(".npy data only fits single-input models; use .npz")
            data, labels = {names[0]: np.load(path, allow_pickle=False)}, None
        elif path.suffix == ".csv":
            if len(names) != 1:
                raise InputDataError(".csv data only fits single-input models; use .npz")
            x, labels = _load_csv(path)
            data = {names[0]: x}
        else:
            raise InputDataError(f"unsupported data file {path.name}: use .npz, .npy or .csv")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputDataError(f"cannot read {path}: {exc}") from exc
    for name, arr in data.items():
        if np.asarray(arr).dtype.kind not in "fiub":
            raise InputDataError(f"{path}: input {name!r} holds {arr.dtype}, not numbers")
    if labels is not None and (labels.dtype.kind not in "fiubUS" or labels.ndim > 2):
        raise InputDataError(
            f"{path}: labels must be numbers or strings, one row per sample; got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    shaped = {info.name: _fit_shape(data[info.name], info) for info in inputs}
    return Dataset(shaped, labels)


def _load_csv(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise InputDataError(f"{path} is empty")
    header = rows[0]
    has_header = any(not _is_number(c) for c in header)
    body = rows[1:] if has_header else rows
    label_idx = next((header.index(k) for k in _LABEL_KEYS if has_header and k in header), None)
    try:
        table = np.asarray([[float(c) for c in r] for r in body if r], dtype=np.float64)
    except ValueError as exc:
        raise InputDataError(f"{path} has a non-numeric cell: {exc}") from exc
    if label_idx is None:
        return table.astype(np.float32), None
    labels = table[:, label_idx].astype(np.int64)
    return np.delete(table, label_idx, axis=1).astype(np.float32), labels


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fit_shape(x: npt.NDArray[Any], info: TensorInfo) -> npt.NDArray[Any]:
    """Reshape flat rows to the model's per-sample shape when the sizes agree."""
    sample = tuple(d for d in info.shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in sample):
        return x
    want = tuple(int(d) for d in sample if isinstance(d, int))
    if x.shape[1:] == want:
        return x
    if int(np.prod(x.shape[1:])) == int(np.prod(want)):
        return x.reshape((len(x), *want))
    raise InputDataError(
        f"input {info.name!r}: samples of shape {x.shape[1:]} do not fit the model's {want}"
    )


def load_contract(path: Path) -> tuple[InputContract, OutputContract]:
    """Load ``{"inputs": ..., "outputs": ...}`` from JSON or TOML.

    Raises:
        InputDataError: unreadable, or not a valid contract (the message names the field).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        obj = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        return (InputContract.from_dict(obj["inputs"]), OutputContract.from_dict(obj["outputs"]))
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise InputDataError(f"cannot read contract {path}: {exc}") from exc
    except ContractError as exc:
        raise InputDataError(f"invalid contract {path}: {exc}") from exc


def infer_contract(
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    calib: Dataset,
    *,
    max_batch: int = 64,
    range_margin: float = RANGE_MARGIN,
    sample_outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    labels: npt.NDArray[Any] | None = None,
) -> tuple[InputContract, OutputContract]:
    """A contract from the model's I/O and the calibration data.

    Ranges: each feature's calibration min/max widened on both sides by ``range_margin`` times
    the larger of its own span and the median span of the tensor's varying features (see
    :func:`inferred_ranges`); NaN is rejected; no preprocessing. A 2-D float output with labels
    (in ``calib``, else ``labels``, e.g. the evaluation set's) becomes a classification output
    whose ``score_kind`` is read from
    ``sample_outputs`` (the float model's answers on the calibration data; see
    :func:`score_kind_of`); anything else is ``raw``.

    Raises:
        InputDataError: the calibration data holds no finite value for a feature.
    """
    tensors = []
    for info in inputs:
        x = np.asarray(calib.inputs[info.name], dtype=np.float64).reshape(len(calib), -1)
        low, high = inferred_ranges(x, range_margin)
        fixed = info.shape[0] if info.shape else None
        top = fixed if isinstance(fixed, int) and 0 < fixed < max_batch else max_batch
        dims = [DimSpec(min=1, max=top, name="batch")]
        dims += [DimSpec(size=int(d)) for d in calib.inputs[info.name].shape[1:]]
        tensors.append(
            TensorSpec(
                name=info.name,
                dtype=info.dtype if info.dtype != "str" else "float32",
                shape=tuple(dims),
                ranges=FeatureRanges(tuple(low.tolist()), tuple(high.tolist())),
            )
        )
    names = tuple(o.name for o in outputs)
    scores = [o for o in outputs if o.dtype.startswith("float") and len(o.shape) == 2]
    known = calib.labels if calib.labels is not None else labels
    if known is not None and scores:
        n_classes = scores[0].shape[1]
        if not isinstance(n_classes, int):
            n_classes = int(np.max(known)) + 1
        kind = "probabilities"
        if sample_outputs is not None and scores[0].name in sample_outputs:
            kind = score_kind_of(sample_outputs[scores[0].name])
        out = OutputContract(
            task="classification",
            outputs=names,
            labels=tuple(str(i) for i in range(n_classes)),
            score_output=scores[0].name,
            score_kind=kind,
        )
    else:
        out = OutputContract(task="raw", outputs=names)
    return InputContract(tuple(tensors)), out


def inferred_ranges(
    x: npt.NDArray[Any], margin: float = RANGE_MARGIN
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-feature ``(low, high)`` from ``x`` shaped ``(samples, features)``. Pure.

    Each side is widened by ``margin * max(span, median_span)``: ``span`` is the feature's own
    max - min, ``median_span`` the median span of the tensor's features that vary. The floor
    matters for features that barely vary in the calibration set (a pixel that was always 0 in
    200 digits is not always 0 on a device); for tabular features of very different scales the
    own span dominates.

    Raises:
        InputDataError: a feature has no finite calibration value.
    """
    finite = np.where(np.isfinite(x), x, np.nan)
    if np.isnan(finite).all(axis=0).any():
        raise InputDataError("calibration data has a feature without any finite value")
    lo, hi = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    span = hi - lo
    varying = span[span > 0]
    floor = float(np.median(varying)) if varying.size else 1.0
    pad = margin * np.maximum(span, floor) + 1e-6
    return (lo - pad).astype(np.float64), (hi + pad).astype(np.float64)


def score_kind_of(scores: npt.NDArray[Any], tol: float = PROBABILITY_SUM_TOL) -> str:
    """``"probabilities"`` when every row is finite, non-negative and sums to 1 within ``tol``;
    else ``"logits"``. Pure.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return "logits"
    s = s.reshape(len(s), -1) if s.ndim else s.reshape(1, -1)
    if not np.isfinite(s).all() or (s < 0).any():
        return "logits"
    return "probabilities" if bool(np.all(np.abs(s.sum(axis=1) - 1.0) <= tol)) else "logits"
