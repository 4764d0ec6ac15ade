"""How a tensor batch becomes the per-sample features drift is tracked on.

Owns: the one flattening and reduction rule that the builder (baseline) and the device (live
sketches) both apply, so their features line up one to one. Does not own: binning or counting
(``edges``, ``tier_a``) or validation of what a request may contain (``edge_agent.contract``).

The rule:

1. The first axis is the batch. Every other axis is flattened in C order, so a batch of shape
   ``(n, d1, ..., dk)`` becomes ``(n, d1*...*dk)``; a 1-D batch ``(n,)`` has one feature.
2. If that gives more than ``max_features`` features (images: thousands of pixels), contiguous
   groups are averaged: with ``f`` flattened values, the group size is
   ``g = ceil(f / max_features)`` and there are ``ceil(f / g) <= max_features`` features;
   feature ``j`` is the mean of flattened values ``[j*g, min((j+1)*g, f))``, so every group has
   ``g`` values except possibly the last, which holds the remainder. A NaN in a group makes the
   group's feature NaN; an infinity makes it infinite (or NaN when both signs occur).
3. The result is always float64, so float32 or integer inputs compare exactly against
   float64 bin edges.

The feature count depends on the tensor's per-sample shape: a model with dynamic non-batch
dimensions gives a different feature count per shape, which a sketch rejects with DriftError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DriftError

#: Default cap on features per tensor; larger samples are reduced by averaging groups.
DEFAULT_MAX_FEATURES = 256


def reduced_feature_count(n_values: int, max_features: int = DEFAULT_MAX_FEATURES) -> int:
    """How many features ``flatten_features`` yields for samples of ``n_values`` values.

    Raises:
        ValueError: ``n_values`` or ``max_features`` is below 1.
    """
    if n_values < 1 or max_features < 1:
        raise ValueError("n_values and max_features must be >= 1")
    group = -(-n_values // max_features)
    return -(-n_values // group)


def flatten_features(
    x: npt.ArrayLike, max_features: int = DEFAULT_MAX_FEATURES
) -> npt.NDArray[np.float64]:
    """Turn a batch into a 2-D ``(n, f)`` float64 array of per-sample features.

    See the module docstring for the rule. No copy is made beyond the float64 conversion, and
    a reduced batch is summed group by group without materialising a float64 copy of it.

    Args:
        x: A batch whose first axis is the batch (rank >= 1), of a real numeric or bool dtype.
        max_features: Cap on features; larger samples are reduced by averaging contiguous groups.

    Returns:
        A C-contiguous float64 array of shape ``(n, f)`` with ``1 <= f <= max_features``.

    Raises:
        DriftError: ``x`` is a scalar, has no values per sample, or is not real-valued numeric.
        ValueError: ``max_features`` is below 1.
    """
    if max_features < 1:
        raise ValueError("max_features must be >= 1")
    arr = np.asarray(x)
    if arr.ndim < 1:
        raise DriftError("drift needs a batch (rank >= 1), got a scalar")
    if arr.dtype.kind not in "biuf":
        raise DriftError(f"drift needs real numeric values, got dtype {arr.dtype}")
    n = arr.shape[0]
    f = math.prod(arr.shape[1:])
    if f < 1:
        raise DriftError(f"a sample of shape {arr.shape[1:]} has no values")
    flat = arr.reshape(n, f)
    if f <= max_features:
        return np.ascontiguousarray(flat, dtype=np.float64)
    return _group_means(flat, max_features)


def _group_means(flat: npt.NDArray[Any], max_features: int) -> npt.NDArray[np.float64]:
    n, f = flat.shape
    group = -(-f // max_features)
    full, rest = divmod(f, group)
    out = np.empty((n, full + (1 if rest else 0)), dtype=np.float64)
    # A group holding both infinities averages to NaN by design; no warning for it.
    with np.errstate(over="ignore", invalid="ignore"):
        _sum_groups(flat, out, group, full, rest)
    return out


def _sum_groups(
    flat: npt.NDArray[Any], out: npt.NDArray[np.float64], group: int, full: int, rest: int
) -> None:
    n = flat.shape[0]
    # Summing with dtype=float64 casts chunk by chunk: no float64 copy of a large image batch.
    np.sum(
        flat[:, : full * group].reshape(n, full, group), axis=2, dtype=np.float64, out=out[:, :full]
    )
    out[:, :full] /= group
    if rest:
        out[:, full] = np.sum(flat[:, full * group :], axis=1, dtype=np.float64) / rest
