"""Ground truth on the device: remember what recent requests predicted, count what was right.

Applications often learn the right answer later (a user corrects a label, a sensor confirms).
``GroundTruth`` keeps a bounded, time-limited memory of recent classification answers given on
the device (request id -> model, version, predicted class per request row) and, when feedback
names one of them, adds the (true, predicted) pairs to that version's ``Confusion`` counts. Both
arms of an A/B split count under the version that answered. It also counts feedback outcomes
(``counted``, ``unknown_id``, ``expired``, ``bad_label``) per model.

Bounds, whatever the traffic: at most ``max_requests`` remembered requests (the oldest go
first), at most ``ROWS_PER_REQUEST * max_requests`` remembered rows in all (a larger request is
not remembered), ids of at most ``MAX_ID_CHARS`` characters, ``MAX_VERSIONS`` counted versions
per model (the least recently counted goes), and models with at most ``MAX_CLASSES`` classes.
An entry older than ``max_seconds`` answers ``expired``. Remembering is O(1) per request (one
dict insert, amortised O(1) eviction, one numpy argmax that the answer needed anyway); feedback
consumes the entry, so a request is counted once.

Owns the memory, the counts and ``predicted_classes`` (an answer's class per request row). Does
not own the HTTP/CLI surface (``edge_agent.api.endpoints``, ``edge_agent.client``), the confusion
matrix (``edge_agent.quality.confusion``) nor the telemetry part
(``edge_agent.wire.telemetry_ground_truth``). Thread-safe; the clock is injected.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from edge_agent.contract.inputs import OutputContract
from edge_agent.errors import InputValidationError, UnknownRequestError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry_ground_truth import MAX_CLASSES, MAX_VERSIONS

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_MAX_SECONDS",
    "MAX_CLASSES",
    "MAX_FEEDBACK_ITEMS",
    "MAX_ID_CHARS",
    "MAX_VERSIONS",
    "OUTCOMES",
    "REASON_LABEL",
    "ROWS_PER_REQUEST",
    "FeedbackResult",
    "GroundTruth",
    "predicted_classes",
]

DEFAULT_MAX_REQUESTS: Final = 10_000
DEFAULT_MAX_SECONDS: Final = 3600.0
#: Average rows per remembered request the row budget allows (``max_requests`` times this).
ROWS_PER_REQUEST: Final = 16
#: Longer request ids are answered but not remembered.
MAX_ID_CHARS: Final = 256
#: Items one feedback call may carry.
MAX_FEEDBACK_ITEMS: Final = 1000
#: Feedback outcomes, counted per model.
OUTCOMES: Final = ("counted", "unknown_id", "expired", "bad_label")
#: ``InputValidationError.reason`` of a label that names no class.
REASON_LABEL: Final = "label"
_NONE: Final = 0xFFFF  # a request row without a device answer (dropped by validation)


def predicted_classes(
    contract: OutputContract,
    outputs: Mapping[str, Any],
    kept: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.uint16] | None:
    """The class the answer predicted for each request row (``_NONE`` for dropped rows).

    None when the model is no classifier the memory can count (no score output, more than
    ``MAX_CLASSES`` classes) or the output does not have the rows expected.
    """
    if contract.task != "classification" or contract.score_output is None:
        return None
    if len(contract.labels) > MAX_CLASSES:
        return None
    scores = outputs.get(contract.score_output)
    if scores is None:
        return None
    if type(scores) is np.ndarray and scores.ndim == 2:
        a = scores  # (rows, classes) already: the common case, no reshape
        rows = a.shape[0]
    else:
        a = np.asarray(scores)
        rows = a.shape[0] if a.ndim else 1
        a = a.reshape(rows, -1)
    if a.shape[1] == 0:
        return None
    if a.shape[1] == 1:  # one column: the positive class of a binary classifier
        cut = 0.0 if contract.score_kind == "logits" else 0.5
        classes = (a[:, 0] > cut).astype(np.uint16)
    else:
        classes = a.argmax(axis=1).astype(np.uint16)
    if kept is None:
        return classes
    if int(np.count_nonzero(kept)) != rows:
        return None
    full = np.full(kept.shape[0], _NONE, dtype=np.uint16)
    full[kept] = classes
    return full


class _Entry(NamedTuple):  # a tuple: cheaper to build than a dataclass on the hot path
    model: str
    version: int
    labels: tuple[str, ...]
    n_classes: int
    classes: bytes  # uint16 per request row
    at: float


@dataclass(frozen=True)
class FeedbackResult:
    """What one feedback item counted.

    Attributes:
        request_id: The request it labelled.
        model_version: The version that answered it.
        counted: Rows added to that version's confusion counts.
        skipped: Rows without a label (null) or without a device answer.
    """

    request_id: str
    model_version: int
    counted: int
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "model_version", "counted", "skipped"}`` (the version as a string, as v2)."""
        return {
            "id": self.request_id,
            "model_version": str(self.model_version),
            "counted": self.counted,
            "skipped": self.skipped,
        }


class GroundTruth:
    """The bounded memory of recent answers and the confusion counts per model version."""

    def __init__(
        self,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.max_rows = max_requests * ROWS_PER_REQUEST
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._rows = 0
        # Per model: version -> counts (mutable numpy, turned into ``Confusion`` when read).
        self._counts: dict[str, OrderedDict[int, npt.NDArray[np.int64]]] = {}
        self._outcomes: dict[str, dict[str, int]] = {}
        self._prefix = os.urandom(6).hex()
        self._serial = itertools.count(1)

    @property
    def enabled(self) -> bool:
        """Whether anything is remembered (``max_requests`` > 0)."""
        return self.max_requests > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def rows_held(self) -> int:
        """Request rows remembered now."""
        return self._rows

    def new_id(self) -> str:
        """A fresh request id, unique in this process (random prefix, then a serial)."""
        return f"{self._prefix}-{next(self._serial)}"

    # ------------------------------------------------------------------ remembering
    def remember(
        self,
        request_id: str,
        model: str,
        version: int,
        labels: Sequence[str],
        classes: npt.NDArray[np.uint16],
    ) -> bool:
        """Remember the answer to ``request_id``; False when it cannot be (too large, too long
        an id, disabled). A request id already held is replaced (the newest answer wins)."""
        rows = int(classes.shape[0])
        if not self.enabled or rows > self.max_rows or len(request_id) > MAX_ID_CHARS:
            return False
        labels = labels if isinstance(labels, tuple) else tuple(labels)
        entry = _Entry(
            model, version, labels, max(len(labels), 2), classes.tobytes(), self._clock()
        )
        with self._lock:
            old = self._entries.pop(request_id, None)
            if old is not None:
                self._rows -= len(old.classes) // 2
            self._entries[request_id] = entry
            self._rows += rows
            while len(self._entries) > self.max_requests or self._rows > self.max_rows:
                _, gone = self._entries.popitem(last=False)
                self._rows -= len(gone.classes) // 2
        return True

    # ------------------------------------------------------------------ feedback
    def feedback(
        self, model: str, request_id: Any, label: Any, *, rows: bool, version: int | None = None
    ) -> FeedbackResult:
        """Count the true answer(s) of an earlier request of ``model``.

        Args:
            model: The model named by the feedback's route.
            request_id: The request's id (its v2 ``id``).
            label: With ``rows`` False, one label for a one-row request; else a list with one
                label (or null) per request row. A label is a class index or a class name.
            rows: Whether ``label`` is the per-row list.
            version: The version the route names, if any: another version's answer is unknown.

        Raises:
            InputValidationError: a malformed id, or a label that names no class (reason
                ``label``; the outcome is counted ``bad_label``).
            UnknownRequestError: no remembered request of ``model`` with this id (never seen,
                forgotten, already labelled) or its memory expired (counted ``unknown_id`` or
                ``expired``).
        """
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
            raise InputValidationError(
                f"feedback 'id' must be a string of 1..{MAX_ID_CHARS} characters",
                field="id",
                reason="schema",
            )
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None or entry.model != model or version not in (None, entry.version):
                self._count(model, "unknown_id")
                raise UnknownRequestError(
                    f"no answer of model {model!r} to request {request_id!r} is remembered "
                    "(unknown, already labelled or forgotten)"
                )
            if self._clock() - entry.at > self.max_seconds:
                del self._entries[request_id]
                self._rows -= len(entry.classes) // 2
                self._count(model, "expired")
                raise UnknownRequestError(
                    f"request {request_id!r} is older than {self.max_seconds:g} s: "
                    "its answer is no longer remembered",
                    expired=True,
                )
            predicted = np.frombuffer(entry.classes, dtype=np.uint16)
            try:
                truth = self._truth(entry, label, rows, predicted.shape[0])
            except InputValidationError:
                self._count(model, "bad_label")
                raise
            del self._entries[request_id]
            self._rows -= len(entry.classes) // 2
            use = (truth >= 0) & (predicted != _NONE)
            counted = int(np.count_nonzero(use))
            if counted:
                grid = self._grid(model, entry.version, entry.n_classes)
                np.add.at(grid, (truth[use], predicted[use].astype(np.int64)), 1)
            self._count(model, "counted", counted)
            return FeedbackResult(request_id, entry.version, counted, predicted.shape[0] - counted)

    def _truth(self, entry: _Entry, label: Any, rows: bool, n_rows: int) -> npt.NDArray[np.int64]:
        if not rows:
            if n_rows != 1:
                raise InputValidationError(
                    f"request has {n_rows} rows: give 'labels', one per row",
                    field="label",
                    reason="schema",
                )
            return np.array([_class_index(entry, label, allow_null=False)], dtype=np.int64)
        if not isinstance(label, list) or len(label) != n_rows:
            raise InputValidationError(
                f"'labels' must be a list of {n_rows} labels (one per request row, null to skip)",
                field="labels",
                reason="schema",
            )
        return np.array([_class_index(entry, x, allow_null=True) for x in label], dtype=np.int64)

    def _grid(self, model: str, version: int, n_classes: int) -> npt.NDArray[np.int64]:
        versions = self._counts.setdefault(model, OrderedDict())
        grid = versions.get(version)
        if grid is None or grid.shape[0] != n_classes:
            grid = versions[version] = np.zeros((n_classes, n_classes), dtype=np.int64)
        versions.move_to_end(version)
        while len(versions) > MAX_VERSIONS:
            versions.popitem(last=False)
        return grid

    def _count(self, model: str, outcome: str, n: int = 1) -> None:
        # Callers pass only models the agent serves (the agent checks): a bounded map.
        out = self._outcomes.setdefault(model, dict.fromkeys(OUTCOMES, 0))
        out[outcome] += n

    # ------------------------------------------------------------------ reading
    def confusion(self, model: str) -> dict[int, Confusion]:
        """The confusion counts of ``model`` per version (cumulative since start)."""
        with self._lock:
            versions = dict(self._counts.get(model, {}))
            return {
                v: Confusion(tuple(tuple(int(c) for c in row) for row in grid))
                for v, grid in versions.items()
            }

    def status(self) -> dict[str, dict[str, Any]]:
        """Per model with feedback: ``{"feedback": outcomes, "confusion": {version: counts}}``
        (the ``ground_truth`` entry of a model in ``Agent.status()``)."""
        with self._lock:
            models = sorted(set(self._outcomes) | set(self._counts))
        out: dict[str, dict[str, Any]] = {}
        for model in models:
            with self._lock:
                outcomes = dict(self._outcomes.get(model, dict.fromkeys(OUTCOMES, 0)))
            out[model] = {
                "feedback": outcomes,
                "confusion": {str(v): c.to_dict() for v, c in self.confusion(model).items()},
            }
        return out


def _class_index(entry: _Entry, label: Any, *, allow_null: bool) -> int:
    """The class index ``label`` names (-1 for an allowed null).

    Raises:
        InputValidationError: reason ``label``: not a class index or name of the model.
    """
    if label is None and allow_null:
        return -1
    if type(label) is int and 0 <= label < entry.n_classes:
        return label
    if isinstance(label, str) and label in entry.labels:
        return entry.labels.index(label)
    shown = repr(label)[:40]
    raise InputValidationError(
        f"label {shown} is not a class of version {entry.version} "
        f"(an index 0..{entry.n_classes - 1} or one of its labels)",
        field="label",
        reason=REASON_LABEL,
    )
