"""Measure a model the way the device runs it: raw data -> declared preprocessing -> runtime.

Owns: scoring a loaded ``Runtime`` (the agent's own adapter, so the gate sees what devices see)
on an evaluation set, for classification and regression contracts, with progress callbacks.
Does not own: deciding whether a score is good enough (``gate``) or reading data files.

Metrics are "higher is better" and lie in [0, 1]:

* classification: top-1 accuracy; rows with non-finite scores count as wrong.
* regression: ``1 - RMSE / std(y)``, floored at 0 (1 is perfect, 0 is no better than predicting
  the mean), so "1 point" means the RMSE grew by 1% of the target's spread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract.inputs import OutputContract, Preprocessing
from edge_agent.errors import ContractError
from edge_agent.runtime.base import Runtime, RuntimeOptions
from model_builder.errors import InputDataError
from model_builder.quantize.calibration import ProgressFn

Array = npt.NDArray[Any]


@dataclass(frozen=True, eq=False)
class Metrics:
    """What one model scored on the evaluation set; ``predictions`` feed the agreement check."""

    task: str
    metric: str
    value: float
    samples: int
    predictions: Array
    target_std: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        keys = ("task", "metric", "value", "samples")
        return {k: getattr(self, k) for k in keys}


def evaluate(
    runtime: Runtime,
    x_raw: Array | Mapping[str, Array],
    y: Array,
    preprocessing: Preprocessing | Mapping[str, Preprocessing],
    contract: OutputContract,
    *,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
) -> Metrics:
    """Score ``runtime`` on raw samples run through the declared preprocessing.

    Args:
        runtime: a loaded model, e.g. the agent's ``OnnxRuntime``.
        x_raw: raw inputs ``(n, ...)``; a mapping by input name for multi-input models.
        y: class indices (or labels named in ``contract.labels``), or regression targets.
        preprocessing: the declared preprocessing (per input name for multi-input models).
        contract: the output contract; its task picks the metric.
        batch_size: samples per ``run`` call.
        progress: called as ``progress(done, total, "evaluation")`` after each batch.

    Returns:
        The metric, in [0, 1], higher is better.

    Raises:
        InputDataError: no samples, mismatched lengths or inputs, unknown labels, or a task the
            gate cannot score ("raw").
        InferenceError: the runtime failed on a batch.
    """
    feeds = _preprocessed_inputs(runtime, x_raw, preprocessing)
    n = len(next(iter(feeds.values())))
    if n == 0 or len(y) != n:
        raise InputDataError(f"evaluation needs equally many samples and targets: {n} vs {len(y)}")
    if contract.task not in ("classification", "regression"):
        raise InputDataError(f"the accuracy gate cannot score a {contract.task!r} output")
    out_name = contract.score_output or contract.outputs[0]
    if out_name not in {o.name for o in runtime.outputs}:
        raise InputDataError(
            f"the contract scores output {out_name!r}; the model has "
            f"{[o.name for o in runtime.outputs]}"
        )
    outputs = []
    total = -(-n // batch_size)
    for i, start in enumerate(range(0, n, batch_size), start=1):
        batch = {k: v[start : start + batch_size] for k, v in feeds.items()}
        outputs.append(np.asarray(runtime.run(batch)[out_name]))
        if progress is not None:
            progress(i, total, "evaluation")
    scores = np.concatenate(outputs).reshape(n, -1).astype(np.float64)
    if contract.task == "classification":
        truth = class_indices(y, contract.labels)
        if len(truth) != n:
            raise InputDataError(
                f"classification needs one label per sample: {np.shape(y)} labels for {n} samples"
            )
        pred = np.where(np.isfinite(scores).all(axis=1), scores.argmax(axis=1), -1)
        return Metrics("classification", "accuracy", float(np.mean(pred == truth)), n, pred)
    target = np.asarray(y, dtype=np.float64).reshape(n, -1)
    rmse = float(np.sqrt(np.mean((scores - target) ** 2)))
    std = float(target.std()) or 1.0
    score = max(0.0, 1.0 - rmse / std) if np.isfinite(rmse) else 0.0
    return Metrics("regression", "rmse_score", score, n, scores, target_std=std)


def measure_onnx(
    model_bytes: bytes,
    x_raw: Array | Mapping[str, Array],
    y: Array,
    preprocessing: Preprocessing | Mapping[str, Preprocessing],
    contract: OutputContract,
    *,
    options: RuntimeOptions | None = None,
    progress: ProgressFn | None = None,
) -> Metrics:
    """Load ``model_bytes`` in the agent's onnxruntime adapter and :func:`evaluate` it.

    Raises:
        ModelLoadError: onnxruntime rejected the model.
        InputDataError: see :func:`evaluate`.
        InferenceError: see :func:`evaluate`.
    """
    from edge_agent.runtime.loader import load_runtime

    runtime = load_runtime(model_bytes, "onnx", options)
    try:
        return evaluate(runtime, x_raw, y, preprocessing, contract, progress=progress)
    finally:
        runtime.close()


def _preprocessed_inputs(
    runtime: Runtime,
    x_raw: Array | Mapping[str, Array],
    preprocessing: Preprocessing | Mapping[str, Preprocessing],
) -> dict[str, Array]:
    names = [i.name for i in runtime.inputs]
    if not isinstance(x_raw, Mapping):
        if len(names) != 1:
            raise InputDataError(f"the model has inputs {names}; pass raw data by input name")
        x_raw = {names[0]: x_raw}
    if isinstance(preprocessing, Preprocessing):
        preprocessing = dict.fromkeys(x_raw, preprocessing)
    if set(x_raw) != set(names):
        raise InputDataError(f"evaluation data has inputs {sorted(x_raw)}, the model {names}")
    if len({len(v) for v in x_raw.values()}) != 1:
        raise InputDataError("evaluation inputs have different sample counts")
    dtypes = {i.name: i.dtype for i in runtime.inputs}
    try:
        return {
            k: preprocessing.get(k, Preprocessing()).apply(np.asarray(v), dtype=dtypes[k])
            for k, v in x_raw.items()
        }
    except (ContractError, ValueError, TypeError) as exc:  # ours, or numpy refusing the cast
        raise InputDataError(f"cannot preprocess the evaluation data: {exc}") from exc


def class_indices(y: Array, labels: Sequence[str]) -> Array:
    """Class indices of ``y``: integers as given, or labels looked up in ``labels``.

    Raises:
        InputDataError: a label that is not in ``labels``.
    """
    arr = np.asarray(y)
    if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
        arr = arr.astype(np.int64)  # class indices that went through a float column (CSV)
    if arr.dtype.kind in "iu":
        return arr.reshape(-1).astype(np.int64)
    index = {label: i for i, label in enumerate(labels)}
    try:
        return np.asarray([index[str(v)] for v in arr.reshape(-1)], dtype=np.int64)
    except KeyError as exc:
        raise InputDataError(f"evaluation label {exc.args[0]!r} is not in the contract") from exc
