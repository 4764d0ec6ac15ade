"""The cloud copies of the models the fallback worker serves, loaded and ready to run.

Owns: ``CloudModel`` (one served model: name, version reported to devices, loaded runtime and
the bundle's signed preprocessing, applied to the raw inputs devices send) and ``CloudModels``
(loading them from a directory of ``<name>.onnx`` / ``<name>.tflite`` files, or from bundles
verified against the trusted root, the highest version of each name winning).

Does not own serving: taking requests, deadlines, answering and resolving models published
later are ``fleet_server.fallback_worker``'s. Does not pick which bundles to load (callers pass
the paths) and does not decide whether a device falls back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy.typing as npt

from edge_agent.contract import BundleManifest
from edge_agent.errors import ContractError, EdgefleetError
from edge_agent.runtime.base import Runtime, RuntimeOptions, load_runtime
from edge_agent.trust import TrustedRoot
from fleet_server.errors import FallbackServingError

__all__ = ["CloudModel", "CloudModels", "Prep"]

#: One input's compiled preprocessing: raw array in, array the graph takes out.
Prep = Callable[[npt.NDArray[Any]], npt.NDArray[Any]]


@dataclass(frozen=True)
class CloudModel:
    """One served model: its name, the version reported to devices, its loaded runtime.

    ``preprocessing`` maps input names to the bundle's signed preprocessing (devices send raw
    inputs, as their clients gave them); empty for a bare ``.onnx`` (the graph takes the
    inputs as they come).
    """

    name: str
    version: str
    runtime: Runtime
    preprocessing: Mapping[str, Prep] = field(default_factory=dict)

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Preprocess and run once.

        Raises:
            ContractError: an input the preprocessing needs is missing or does not fit.
            InferenceError: the runtime refused the feeds.
        """
        feeds = dict(inputs)
        for name, fn in self.preprocessing.items():
            if name not in feeds:
                raise ContractError(f"input {name!r} is missing")
            try:
                feeds[name] = fn(feeds[name])
            except (ValueError, TypeError) as exc:
                raise ContractError(
                    f"input {name!r} does not fit its preprocessing: {exc}"
                ) from exc
        return self.runtime.run(feeds)


class CloudModels:
    """Loads cloud models by name (onnxruntime for ``.onnx``, LiteRT for ``.tflite``)."""

    @staticmethod
    def from_dir(directory: Path, options: RuntimeOptions | None = None) -> dict[str, CloudModel]:
        """Every ``<name>.onnx`` / ``<name>.tflite`` in ``directory``; version = ``sha256:<12>``.

        Raises:
            FallbackServingError: the directory is unreadable, two files share a name, or a
                runtime refuses a model.
        """
        try:
            files = sorted(p for p in Path(directory).iterdir() if p.suffix in (".onnx", ".tflite"))
        except OSError as exc:
            raise FallbackServingError(
                f"cannot list fallback models in {directory}: {exc}"
            ) from exc
        out: dict[str, CloudModel] = {}
        for path in files:
            if path.stem in out:
                raise FallbackServingError(f"two cloud models named {path.stem!r} in {directory}")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FallbackServingError(f"cannot read {path}: {exc}") from exc
            version = "sha256:" + hashlib.sha256(data).hexdigest()[:12]
            out[path.stem] = CloudModel(path.stem, version, _load(data, path.suffix[1:], options))
        return out

    @staticmethod
    def from_bundles(
        paths: Iterable[Path],
        root: TrustedRoot,
        *,
        now: datetime,
        options: RuntimeOptions | None = None,
    ) -> dict[str, CloudModel]:
        """The artifact of each verified bundle, under its manifest name and version.

        For several bundles of one name the highest version wins.

        Raises:
            FallbackServingError: a bundle fails verification or its model cannot be loaded.
        """
        from edge_agent.bundle import read_bundle

        best: dict[str, tuple[int, bytes, BundleManifest]] = {}
        for path in paths:
            try:
                b = read_bundle(path, root, now=now, installed_version=None, device=None)
            except (EdgefleetError, OSError) as exc:
                raise FallbackServingError(f"cannot serve {path}: {exc}") from exc
            m = b.manifest
            if m.name not in best or m.version > best[m.name][0]:
                best[m.name] = (m.version, b.artifact, m)
        out: dict[str, CloudModel] = {}
        for name, (v, art, m) in best.items():
            runtime = _load(art, m.artifact.format, options)
            dtypes = {i.name: i.dtype for i in runtime.inputs}
            prep = {
                t.name: t.preprocessing.compile(dtypes.get(t.name, t.dtype))
                for t in m.inputs.tensors
            }
            out[name] = CloudModel(name, str(v), runtime, prep)
        return out


def _load(artifact: bytes, fmt: str, options: RuntimeOptions | None) -> Runtime:
    try:
        return load_runtime(artifact, fmt, options)
    except EdgefleetError as exc:
        raise FallbackServingError(f"cannot load a {fmt} cloud model: {exc}") from exc
