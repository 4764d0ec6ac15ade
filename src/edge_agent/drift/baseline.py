"""The drift baseline a bundle signs: tier-A views (and optional tier-B KLL bytes) per tensor.

Owns: ``DriftBaseline`` (value object, strict ``to_dict/from_dict``), ``build_baseline`` (the
builder's entry point, which fits edges and counts with the device's own ``TierASketch``) and
the device's way back to empty trackers with the baseline's edges. Does not own: sketch
internals (``tier_a``, ``view``, ``kll``), scores or thresholds, or where the baseline is stored
(the bundle manifest embeds ``to_dict()``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import (
    MAX_FEATURES,
    check_keys,
    get,
    read_int,
    read_schema_version,
    require_mapping,
)
from edge_agent.drift.edges import fit_edges
from edge_agent.drift.features import DEFAULT_MAX_FEATURES, flatten_features
from edge_agent.drift.kll import KllFeatureSketches, read_header
from edge_agent.drift.tier_a import TierASketch
from edge_agent.drift.view import TierAView
from edge_agent.errors import ContractError, DriftError

SCHEMA_VERSION = 1
ROLES = ("input", "output")
_KEYS = ("schema_version", "max_features", "inputs", "outputs", "kll")


@dataclass(frozen=True)
class DriftBaseline:
    """Per-tensor baseline sketches of a model's inputs and outputs.

    Attributes:
        inputs: Tier-A view per input tensor name.
        outputs: Tier-A view per output tensor name (names never repeat an input's).
        kll: Optional ``KllFeatureSketches.to_bytes()`` per tensor name (input or output).
        max_features: The ``flatten_features`` cap the baseline was built with; the device must
            flatten with the same value (``features`` does).
        schema_version: Version of the ``to_dict`` layout.

    Raises:
        ContractError: (from the constructor) a name is empty or used twice, a value has the
            wrong type, a view has more features than ``max_features``, or KLL bytes have a
            bad header or a feature count different from the tensor's view.
    """

    inputs: Mapping[str, TierAView] = field(default_factory=dict)
    outputs: Mapping[str, TierAView] = field(default_factory=dict)
    kll: Mapping[str, bytes] = field(default_factory=dict)
    max_features: int = DEFAULT_MAX_FEATURES
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"drift baseline schema_version {self.schema_version} unsupported")
        if (
            isinstance(self.max_features, bool)
            or not isinstance(self.max_features, int)
            or not 1 <= self.max_features <= MAX_FEATURES
        ):
            raise ContractError(f"drift baseline: max_features must be in [1, {MAX_FEATURES}]")
        for role, views in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not isinstance(views, Mapping):
                raise ContractError(f"drift baseline: {role} must be a mapping")
            for name, view in views.items():
                if not isinstance(name, str) or not name:
                    raise ContractError(f"drift baseline: {role} names must be non-empty strings")
                if not isinstance(view, TierAView):
                    raise ContractError(f"drift baseline: {role}[{name!r}] is not a TierAView")
                if view.n_features > self.max_features:
                    raise ContractError(
                        f"drift baseline: {role}[{name!r}] has {view.n_features} features, "
                        f"more than max_features {self.max_features}"
                    )
            object.__setattr__(self, role, MappingProxyType(dict(views)))
        clash = sorted(set(self.inputs) & set(self.outputs))
        if clash:
            raise ContractError(f"drift baseline: tensors {clash} are both inputs and outputs")
        if not isinstance(self.kll, Mapping):
            raise ContractError("drift baseline: kll must be a mapping")
        for name, blob in self.kll.items():
            found = self.inputs[name] if name in self.inputs else self.outputs.get(name)
            if found is None:
                raise ContractError(f"drift baseline: kll[{name!r}] names no input or output")
            if not isinstance(blob, bytes):
                raise ContractError(f"drift baseline: kll[{name!r}] must be bytes")
            f, _k = read_header(blob)
            if f != found.n_features:
                raise ContractError(
                    f"drift baseline: kll[{name!r}] has {f} features, its view {found.n_features}"
                )
        object.__setattr__(self, "kll", MappingProxyType(dict(self.kll)))

    def view(self, name: str, role: str = "input") -> TierAView:
        """The baseline view of tensor ``name`` in ``role`` (``"input"`` or ``"output"``).

        Raises:
            DriftError: no such tensor in that role, or an unknown role.
        """
        if role not in ROLES:
            raise DriftError(f"role must be one of {ROLES}, got {role!r}")
        views = self.inputs if role == "input" else self.outputs
        if name not in views:
            raise DriftError(f"the drift baseline has no {role} named {name!r}")
        return views[name]

    def tracker_for(self, name: str, role: str = "input") -> TierASketch:
        """An empty tracker with the baseline's edges for tensor ``name``.

        Raises:
            DriftError: no such tensor in that role, or an unknown role.
        """
        return TierASketch.zero(self.view(name, role).edges)

    def input_trackers(self) -> dict[str, TierASketch]:
        """An empty tracker per input tensor."""
        return {name: TierASketch.zero(v.edges) for name, v in self.inputs.items()}

    def output_trackers(self) -> dict[str, TierASketch]:
        """An empty tracker per output tensor."""
        return {name: TierASketch.zero(v.edges) for name, v in self.outputs.items()}

    def features(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``flatten_features(x, self.max_features)``: what the trackers expect.

        Raises:
            DriftError: as ``flatten_features``.
        """
        return flatten_features(x, self.max_features)

    def kll_sketches(self, name: str) -> KllFeatureSketches | None:
        """The tier-B sketches of tensor ``name``, or None if the baseline has none.

        Raises:
            ContractError: the stored bytes do not deserialise.
        """
        blob = self.kll.get(name)
        return None if blob is None else KllFeatureSketches.from_bytes(blob)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (KLL bytes as standard base64)."""
        return {
            "schema_version": self.schema_version,
            "max_features": self.max_features,
            "inputs": {n: v.to_dict() for n, v in sorted(self.inputs.items())},
            "outputs": {n: v.to_dict() for n, v in sorted(self.outputs.items())},
            "kll": {n: base64.b64encode(b).decode("ascii") for n, b in sorted(self.kll.items())},
        }

    @classmethod
    def from_dict(cls, d: Any) -> DriftBaseline:
        """Parse ``to_dict`` output strictly.

        Raises:
            ContractError: a field is missing, unknown, of the wrong type or inconsistent; the
                message names the tensor and field.
        """
        d = require_mapping(d, "drift baseline")
        check_keys(d, _KEYS, "drift baseline")
        version = read_schema_version(d, "drift baseline", SCHEMA_VERSION)
        max_features = read_int(d, "max_features", "drift baseline", 1, MAX_FEATURES)
        views: dict[str, dict[str, TierAView]] = {}
        for role in ("inputs", "outputs"):
            raw = require_mapping(get(d, role, "drift baseline"), f"drift baseline {role}")
            views[role] = {}
            for name, item in raw.items():
                try:
                    views[role][name] = TierAView.from_dict(item)
                except ContractError as exc:
                    raise ContractError(f"drift baseline {role}[{name!r}]: {exc}") from exc
        raw_kll = require_mapping(get(d, "kll", "drift baseline"), "drift baseline kll")
        kll: dict[str, bytes] = {}
        for name, text in raw_kll.items():
            if not isinstance(text, str):
                raise ContractError(f"drift baseline kll[{name!r}] must be a base64 string")
            try:
                kll[name] = base64.b64decode(text, validate=True)
            except binascii.Error as exc:
                raise ContractError(f"drift baseline kll[{name!r}] is not base64") from exc
        return cls(views["inputs"], views["outputs"], kll, max_features, version)


def build_baseline(
    inputs: Mapping[str, npt.ArrayLike],
    outputs: Mapping[str, npt.ArrayLike],
    n_bins: int = 10,
    kll_k: int | None = None,
    max_features: int = DEFAULT_MAX_FEATURES,
) -> DriftBaseline:
    """Build a baseline from reference batches with the device's own tracker code.

    Every tensor is flattened with ``flatten_features(x, max_features)``, its edges are fitted
    with ``fit_edges(x2d, n_bins)``, and a ``TierASketch`` with those edges counts the same
    data. With ``kll_k``, tier-B ``KllFeatureSketches`` of that ``k`` are added too.

    Args:
        inputs: Reference batch per input tensor name (first axis = batch).
        outputs: The model's outputs on those inputs, per output tensor name.
        n_bins: Bins per feature (fewer where ties collapse quantiles).
        kll_k: KLL accuracy parameter, or None for tier A only.
        max_features: Feature cap per tensor (see ``flatten_features``).

    Returns:
        The baseline.

    Raises:
        DriftError: a tensor is not a real-valued batch, or a feature has no finite value.
        ContractError: a name is empty or is both an input and an output.
        ValueError: ``n_bins``, ``kll_k`` or ``max_features`` is out of range.
    """
    views: dict[str, dict[str, TierAView]] = {"inputs": {}, "outputs": {}}
    kll: dict[str, bytes] = {}
    for role, tensors in (("inputs", inputs), ("outputs", outputs)):
        for name, x in tensors.items():
            x2d = flatten_features(x, max_features)
            tracker = TierASketch.zero(fit_edges(x2d, n_bins))
            tracker.update(x2d)
            views[role][name] = tracker.view()
            if kll_k is not None:
                sketches = KllFeatureSketches(x2d.shape[1], kll_k)
                sketches.update(x2d)
                kll[name] = sketches.to_bytes()
    return DriftBaseline(views["inputs"], views["outputs"], kll, max_features)
