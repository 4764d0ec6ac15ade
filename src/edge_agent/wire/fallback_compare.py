"""Disagreement between a device answer and a cloud answer for the same rows (pure).

Owns ``compare_outputs`` and its result ``Comparison``: the one measure the device
(``edge_agent.serving.fallback_mqtt``) and the server (``fleet_server.fallback.worker``) both
compute, so their counters agree. Does not own the fallback wire format
(``edge_agent.wire.fallback``) and never sends anything or runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Comparison", "compare_outputs"]

TensorMap = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Comparison:
    """How far a device answer and a cloud answer for the same rows disagree.

    Attributes:
        rows: Rows compared (leading axes flattened; 0 when nothing was comparable).
        disagree_rows: Rows whose top class differs (more than one column) or whose single
            value differs by more than the tolerance (one column / regression).
        comparable: False when no output name was shared with matching shapes.
    """

    rows: int
    disagree_rows: int
    comparable: bool


def compare_outputs(
    device: TensorMap, cloud: TensorMap, *, rtol: float = 0.05, atol: float = 1e-3
) -> Comparison:
    """Compare the device's and the cloud's outputs row by row (pure).

    Only outputs present on both sides with the same shape are compared; the row count is the
    largest over them and a row disagrees when it disagrees in any compared output. Scores
    with several columns are compared by their argmax (a quantised device model and a float
    cloud model agree when they pick the same class); single values by ``rtol``/``atol``.
    Non-finite values on either side count as disagreement.
    """
    worst: npt.NDArray[np.bool_] | None = None
    for name in sorted(set(device) & set(cloud)):
        d, c = np.asarray(device[name]), np.asarray(cloud[name])
        if (
            d.shape != c.shape
            or d.size == 0
            or d.dtype.kind not in "fiub"
            or c.dtype.kind not in "fiub"
        ):
            continue
        last = d.shape[-1] if d.ndim else 1
        d2 = d.astype(np.float64).reshape(-1, last)
        c2 = c.astype(np.float64).reshape(-1, last)
        bad = ~(np.isfinite(d2).all(axis=1) & np.isfinite(c2).all(axis=1))
        if last > 1:
            diff = np.argmax(d2, axis=1) != np.argmax(c2, axis=1)
        else:
            diff = ~np.isclose(d2[:, 0], c2[:, 0], rtol=rtol, atol=atol)
        rows = bad | diff
        if worst is None or rows.shape[0] > worst.shape[0]:
            worst = (
                rows
                if worst is None
                else np.concatenate([rows[: worst.shape[0]] | worst, rows[worst.shape[0] :]])
            )
        else:
            worst[: rows.shape[0]] |= rows
    if worst is None:
        return Comparison(0, 0, False)
    return Comparison(int(worst.shape[0]), int(np.count_nonzero(worst)), True)
