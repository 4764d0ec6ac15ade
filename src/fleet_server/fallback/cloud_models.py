"""The cloud copies of the models the fallback worker serves, loaded and ready to run.

Owns: ``CloudModel`` (one served model: name, version reported to devices, loaded runtime and
the bundle's signed preprocessing, applied to the raw inputs devices send) and ``CloudModels``
(loading them from a directory of ``<name>.onnx`` / ``<name>.tflite`` files, or from bundles
verified against the trusted root, the highest version of each name winning), and
``RegistryCloudModels``, the ``CloudModelSource`` the server's fallback worker asks: the cloud
model of one *published version* (the version's bundle, or a float/larger model the operator
registered for that version or for every version of the name), and which version a device runs
by the registry (for requests of agents that do not say).

Does not own serving: taking requests, deadlines, answering and resolving models published
later are ``fleet_server.fallback.worker``'s. Does not pick which bundles to load (callers pass
the paths) and does not decide whether a device falls back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from edge_agent.contract import BundleManifest
from edge_agent.errors import ContractError, EdgefleetError
from edge_agent.runtime.base import Runtime, RuntimeOptions
from edge_agent.runtime.loader import load_runtime
from edge_agent.trust import TrustedRoot
from fleet_server.errors import (
    FallbackServingError,
    RegistryError,
    RegistryUnavailableError,
    UnknownDeviceError,
)
from fleet_server.registry.store import Registry

__all__ = ["CloudModel", "CloudModelSource", "CloudModels", "Prep", "RegistryCloudModels"]

#: Separates a model name from the version a ``models_dir`` file serves (``digits@2.onnx``).
VERSION_MARK = "@"

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


class CloudModelSource(Protocol):
    """Where the fallback worker gets the cloud model of one version (see ``FallbackWorker``)."""

    def load(self, name: str, version: int) -> CloudModel | None:
        """The cloud model that answers for ``name`` v``version``; None when that version is
        not served (not published, unknown).

        Raises:
            EdgefleetError: the model could not be loaded or the registry not read.
        """
        ...

    def version_of(self, name: str, device_id: str) -> int | None:
        """The version of ``name`` the device runs, by the server's records (None: unknown).

        Raises:
            EdgefleetError: the registry could not be read.
        """
        ...


class RegistryCloudModels:
    """``CloudModelSource`` over the registry, the bundle library and an optional directory.

    ``load(name, v)`` serves only published versions: ``<name>@<v>.onnx|.tflite`` from
    ``models_dir`` when the operator registered one for that version (a float or larger model;
    answers as ``"<v>+sha256:<12>"``), else ``<name>.onnx|.tflite`` (one model for every
    version of the name; answers as ``"sha256:<12>"``), else the published bundle of ``v``
    itself, verified against the current root (answers as ``"<v>"``). ``version_of`` reads the
    device's reported state: the active version, else the assigned one.
    """

    def __init__(
        self,
        registry: Registry,
        bundles_dir: Path,
        root: Callable[[], TrustedRoot],
        *,
        clock: Callable[[], datetime],
        models_dir: Path | None = None,
        options: RuntimeOptions | None = None,
    ) -> None:
        """Load ``models_dir`` now (bundles are loaded when first asked for).

        Raises:
            FallbackServingError: a model in ``models_dir`` cannot be loaded, or a file name
                has a version mark that is not a version.
        """
        self._registry, self._dir, self._root, self._clock = registry, bundles_dir, root, clock
        self._options = options
        self._wide: dict[str, CloudModel] = {}
        self._per_version: dict[tuple[str, int], CloudModel] = {}
        files = CloudModels.from_dir(models_dir, options) if models_dir else {}
        for stem, m in files.items():
            name, mark, v = stem.rpartition(VERSION_MARK)
            if not mark:
                self._wide[stem] = m
            elif v.isascii() and v.isdigit() and int(v) >= 1 and name:
                self._per_version[(name, int(v))] = CloudModel(
                    name, f"{v}+{m.version}", m.runtime, m.preprocessing
                )
            else:
                raise FallbackServingError(f"cloud model file {stem!r}: expected <name>@<version>")

    def describe(self) -> str:
        """One line for the log: what answers which version."""
        parts = [f"{n}@{v}" for n, v in sorted(self._per_version)] + sorted(self._wide)
        extra = f" ({', '.join(parts)} from the models directory)" if parts else ""
        return "the published bundle of the version each device runs" + extra

    def load(self, name: str, version: int) -> CloudModel | None:
        """See ``CloudModelSource.load``.

        Raises:
            RegistryUnavailableError: the database failed.
            FallbackServingError: the bundle fails verification or cannot be loaded.
        """
        try:
            bundle = self._registry.get_bundle(name, version)
        except RegistryUnavailableError:
            raise
        except RegistryError:
            return None  # not published: never answered with another version instead
        registered = self._per_version.get((name, version)) or self._wide.get(name)
        if registered is not None:
            return registered
        path = self._dir / f"{bundle.sha256}.bundle"
        models = CloudModels.from_bundles(
            [path], self._root(), now=self._clock(), options=self._options
        )
        model = models.get(name)
        if model is None or model.version != str(version):
            raise FallbackServingError(f"bundle {bundle.sha256[:12]} is not {name} v{version}")
        return model

    def version_of(self, name: str, device_id: str) -> int | None:
        """See ``CloudModelSource.version_of``.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        try:
            device = self._registry.get_device(device_id)
        except UnknownDeviceError:
            return None
        report = ((device.reported or {}).get("models") or {}).get(name) or {}
        for key in ("active", "assigned"):
            v = report.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                return v
        return None
