"""Calibration data: raw samples run through the declared preprocessing, and their statistics.

Owns: ``CalibrationSource`` (raw arrays per model input plus the contract's ``Preprocessing``),
batching into preprocessed feeds for onnxruntime's calibrator, and the per-input statistics
that catch the usual calibration mistake, data that skipped its normalisation. Does not own:
reading files (the CLI does) or running any model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract.inputs import InputContract, Preprocessing
from edge_agent.errors import ContractError
from model_builder.errors import InputDataError

Array = npt.NDArray[Any]
ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(done, total, label)``; label is e.g. "calibration" or "evaluation"."""

# Inputs after their declared preprocessing usually sit within a few units of zero
# (standardised, [0, 1] or [-1, 1]). Well beyond that suggests the normalisation was skipped.
UNNORMALISED_P99 = 10.0
UNNORMALISED_MEAN = 5.0


@dataclass(frozen=True, eq=False)
class CalibrationSource:
    """Raw calibration samples per model input and the preprocessing the device will apply.

    ``raw[name]`` is shaped ``(n, ...)``; every input has the same ``n``. Inputs missing from
    ``preprocessing`` use identity. Calibration runs ``raw -> Preprocessing.apply -> model``,
    exactly the path requests take on the device.

    Raises:
        InputDataError: no inputs, no samples, unequal sample counts, a bad batch size, or
            non-finite values.
    """

    raw: Mapping[str, Array]
    preprocessing: Mapping[str, Preprocessing] = field(default_factory=dict)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.raw:
            raise InputDataError("calibration data has no inputs")
        counts = {name: int(np.shape(x)[0]) if np.ndim(x) else 0 for name, x in self.raw.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise InputDataError(
                f"calibration inputs need the same, non-zero sample count: {counts}"
            )
        if self.batch_size < 1:
            raise InputDataError("calibration batch size must be at least 1")
        for name, x in self.raw.items():
            arr = np.asarray(x)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InputDataError(f"calibration input {name!r} holds NaN or Inf values")

    @classmethod
    def single(
        cls, name: str, raw: Array, preprocessing: Preprocessing | None = None, batch_size: int = 32
    ) -> CalibrationSource:
        """A source for a single-input model.

        Raises:
            InputDataError: see the class docstring.
        """
        pre = {name: preprocessing} if preprocessing is not None else {}
        return cls({name: raw}, pre, batch_size)

    @classmethod
    def from_contract(
        cls, raw: Mapping[str, Array], contract: InputContract, batch_size: int = 32
    ) -> CalibrationSource:
        """A source whose preprocessing is what ``contract`` declares for each input.

        Raises:
            InputDataError: see the class docstring, or ``raw`` names an input the contract lacks.
        """
        try:
            pre = {name: contract.tensor(name).preprocessing for name in raw}
        except ContractError as exc:
            raise InputDataError(f"calibration data does not fit the contract: {exc}") from exc
        return cls(raw, pre, batch_size)

    @property
    def num_samples(self) -> int:
        return int(np.shape(next(iter(self.raw.values())))[0])

    def check_inputs(self, model_inputs: Sequence[str]) -> None:
        """Check the source feeds exactly the model's inputs.

        Raises:
            InputDataError: an input is missing or unknown to the model.
        """
        missing = set(model_inputs) - set(self.raw)
        extra = set(self.raw) - set(model_inputs)
        if missing or extra:
            raise InputDataError(
                f"calibration data does not match the model inputs: missing {sorted(missing)}, "
                f"unknown {sorted(extra)}"
            )

    def preprocessed(self, name: str, dtype: str = "float32") -> Array:
        """All samples of input ``name`` after its preprocessing, as ``dtype``.

        Raises:
            InputDataError: the preprocessing does not fit the data's shape.
        """
        pre = self.preprocessing.get(name, Preprocessing())
        try:
            return pre.apply(np.asarray(self.raw[name]), dtype=dtype)
        except ContractError as exc:
            raise InputDataError(f"calibration input {name!r}: {exc}") from exc

    def batches(self, dtypes: Mapping[str, str]) -> Iterator[dict[str, Array]]:
        """Preprocessed feeds of at most ``batch_size`` samples, cast to the model's dtypes.

        Raises:
            InputDataError: the preprocessing does not fit the data's shape.
        """
        full = {name: self.preprocessed(name, dtypes.get(name, "float32")) for name in self.raw}
        for start in range(0, self.num_samples, self.batch_size):
            yield {name: x[start : start + self.batch_size] for name, x in full.items()}

    def reader(self, dtypes: Mapping[str, str], progress: ProgressFn | None = None) -> Any:
        """An onnxruntime ``CalibrationDataReader`` over :meth:`batches`.

        Raises:
            InputDataError: the preprocessing does not fit the data's shape.
        """
        from onnxruntime.quantization import CalibrationDataReader

        total = -(-self.num_samples // self.batch_size)
        feeds = list(self.batches(dtypes))

        class _Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._next = 0

            def get_next(self) -> dict[str, Array] | None:
                if self._next >= len(feeds):
                    return None
                self._next += 1
                if progress is not None:
                    progress(self._next, total, "calibration")
                return feeds[self._next - 1]

            def __len__(self) -> int:
                return len(feeds)

        return _Reader()


def input_stats(x: Array) -> dict[str, Any]:
    """min/max/mean/std/99th percentile of |x| and the un-normalised flag for one input."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    p99 = float(np.percentile(np.abs(flat), 99)) if flat.size else 0.0
    mean = float(flat.mean()) if flat.size else 0.0
    stats: dict[str, Any] = {
        "min": float(flat.min()) if flat.size else 0.0,
        "max": float(flat.max()) if flat.size else 0.0,
        "mean": mean,
        "std": float(flat.std()) if flat.size else 0.0,
        "p99_abs": p99,
        "looks_unnormalised": p99 > UNNORMALISED_P99 or abs(mean) > UNNORMALISED_MEAN,
    }
    if stats["looks_unnormalised"]:
        stats["hint"] = (
            f"after preprocessing, 99% of values lie within |x| <= {p99:.3g} and the mean is "
            f"{mean:.3g}; models usually see normalised inputs of a few units at most. A missing "
            f"normalisation step is the usual culprit: check the contract's preprocessing."
        )
    return stats


def calibration_stats(source: CalibrationSource) -> dict[str, dict[str, Any]]:
    """Per input, statistics of the *preprocessed* calibration data (see :func:`input_stats`).

    The float model's training statistics are not available to the builder, so the flag
    compares against what normalised data looks like rather than against the training set.

    Raises:
        InputDataError: the preprocessing does not fit the data's shape.
    """
    return {name: input_stats(source.preprocessed(name)) for name in source.raw}
