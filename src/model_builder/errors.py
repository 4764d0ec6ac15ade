"""Errors raised by the model builder, grouped by who must react.

InputDataError     the calibration/evaluation data or contract file is unusable (the ML
                   engineer fixes the data).
  ContractMismatchError  the contract names inputs/outputs, ranks, shapes or dtypes the
                   model does not have.
  ChampionMismatchError  the ``--compare-to`` bundle cannot be compared with the new model
                   (another model name, or other inputs, task or labels).
ModelCheckError    the source model fails ``onnx.checker`` or cannot be loaded.
QuantizationError  the quantizer failed or a mode does not fit the model.
AccuracyGateError  quantization lost too much accuracy and no rescue passed the gate.
ChampionRegressionError  the new model is worse than the ``--compare-to`` champion beyond the
                   limits, and no ``--allow-regression`` reason was given.
KeyStoreError      keys or root metadata are missing, unreadable or inconsistent.

``ERRORS`` (at the end) is edge_agent's one error table extended with these families' exit
codes; the ``model-builder`` CLI exits with them.
"""

from __future__ import annotations

from typing import Any

from edge_agent import errors as device_errors
from edge_agent.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_KEYS,
    EXIT_RUNTIME,
    EdgefleetError,
    ErrorRow,
)


class ModelBuilderError(EdgefleetError):
    """Base of builder errors."""

    code = "builder_error"


class InputDataError(ModelBuilderError):
    """Calibration, evaluation or contract input cannot be used."""

    code = "input_data"


class ContractMismatchError(InputDataError):
    """The input/output contract does not fit the model (names, rank, shape, dtype, classes)."""

    code = "contract_mismatch"


class ChampionMismatchError(InputDataError):
    """The champion bundle (``--compare-to``) is of another model name, or its contract cannot
    be compared with the new model's (other input names or sample shapes, task, or labels)."""

    code = "champion_mismatch"


class ModelCheckError(ModelBuilderError):
    """The source model is invalid."""

    code = "model_check"


class QuantizationError(ModelBuilderError):
    """Quantization failed or the requested mode does not suit the model."""

    code = "quantization"


class AccuracyGateError(ModelBuilderError):
    """The quantized model failed the accuracy gate and no rescue passed it.

    ``report`` carries the measured figures and what the rescue search tried.
    """

    code = "accuracy_gate"

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class ChampionRegressionError(ModelBuilderError):
    """The new model is worse than the champion it replaces beyond the comparison limits.

    ``report`` is the whole build report, ``comparison`` included (no bundle was signed).
    """

    code = "champion_regression"

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class KeyStoreError(ModelBuilderError):
    """A key store or root metadata problem."""

    code = "keystore"


#: ``edge_agent.errors.ERRORS`` plus the builder's families (exit codes).
ERRORS = device_errors.ERRORS.extend(
    (
        ErrorRow(AccuracyGateError, exit=EXIT_GATE),
        ErrorRow(ChampionRegressionError, exit=EXIT_GATE),
        ErrorRow(KeyStoreError, exit=EXIT_KEYS),
        ErrorRow(InputDataError, exit=EXIT_BAD_INPUT),
        ErrorRow(ModelBuilderError, exit=EXIT_RUNTIME),
    )
)
