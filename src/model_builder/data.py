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
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read {path}: {exc}") from exc
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
    range_margin: float = 0.1,
) -> tuple[InputContract, OutputContract]:
    """A contract from the model's I/O and the calibration data.

    Ranges are the calibration min/max widened by ``range_margin`` of their span; NaN is
    rejected; no preprocessing. A single 2-D float output with labels in the data becomes a
    classification output; anything else is ``raw``.
    """
    tensors = []
    for info in inputs:
        x = np.asarray(calib.inputs[info.name], dtype=np.float64).reshape(len(calib), -1)
        lo, hi = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
        pad = (hi - lo) * range_margin + 1e-6
        dims = [DimSpec(min=1, max=max_batch, name="batch")]
        dims += [DimSpec(size=int(d)) for d in calib.inputs[info.name].shape[1:]]
        tensors.append(
            TensorSpec(
                name=info.name,
                dtype=info.dtype if info.dtype != "str" else "float32",
                shape=tuple(dims),
                ranges=FeatureRanges(tuple((lo - pad).tolist()), tuple((hi + pad).tolist())),
            )
        )
    names = tuple(o.name for o in outputs)
    scores = [o for o in outputs if o.dtype.startswith("float") and len(o.shape) == 2]
    if calib.labels is not None and scores:
        n_classes = scores[0].shape[1]
        if not isinstance(n_classes, int):
            n_classes = int(np.max(calib.labels)) + 1
        out = OutputContract(
            task="classification",
            outputs=names,
            labels=tuple(str(i) for i in range(n_classes)),
            score_output=scores[0].name,
        )
    else:
        out = OutputContract(task="raw", outputs=names)
    return InputContract(tuple(tensors)), out
