"""The bundle manifest: everything a device needs to run a model safely, as one signed document.

Owns: the manifest value objects, their strict ``to_dict/from_dict`` and canonical
``to_bytes/from_bytes``, and the compatibility check against a device profile. The manifest's
SHA-256 and length are what the builder's targets metadata signs, so the model artifact, input
contract, preprocessing, baseline, golden samples and runtime constraints can never be mixed
and matched. Does not own: signatures (``edge_agent.trust``) or reading bundle files
(``edge_agent.bundle``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from edge_agent import strict_json
from edge_agent.contract._fields import req, req_float, req_int, req_list, req_str
from edge_agent.contract.cpu import unmet_requirements, validate_requirements
from edge_agent.contract.inputs import InputContract, OutputContract
from edge_agent.drift import DriftBaseline
from edge_agent.errors import ContractError, IncompatibleTargetError
from edge_agent.ids import validate_name

SCHEMA_VERSION = 1
#: The largest manifest any reader accepts (golden samples make it the biggest document).
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
#: Versions are exact in every JSON reader and fit every database's BIGINT.
MAX_VERSION = 2**53 - 1
#: Longest ``compatibility.min_runtime_version`` (e.g. ``1.16.3``) any reader accepts.
MAX_RUNTIME_VERSION_LENGTH = 64
ARTIFACT_FORMATS = ("onnx", "tflite")
RUNTIME_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def validate_model_name(name: str) -> str:
    """Model names are lowercase, 1-63 chars of [a-z0-9._-]; they become paths and topics.

    The rule is ``edge_agent.ids.validate_name``'s (its one owner).

    Raises:
        ContractError: not a valid name.
    """
    return validate_name(name, "model name")


@dataclass(frozen=True)
class ArtifactRef:
    """The model file inside the bundle: member path, format, SHA-256 and exact length."""

    path: str
    format: str
    sha256: str
    length: int

    def __post_init__(self) -> None:
        if self.format not in ARTIFACT_FORMATS:
            raise ContractError(f"artifact format must be one of {ARTIFACT_FORMATS}")
        if self.path != f"model.{self.format}":
            raise ContractError(f"artifact path must be model.{self.format}, got {self.path!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ContractError("artifact sha256 must be 64 lowercase hex digits")
        if self.length < 1:
            raise ContractError("artifact length must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "length": self.length,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactRef:
        return cls(
            req_str(d, "path"), req_str(d, "format"), req_str(d, "sha256"), req_int(d, "length")
        )


@dataclass(frozen=True)
class GoldenSample:
    """One input with its expected outputs, checked after install.

    ``inputs`` and ``expected`` map tensor names to nested lists. An output matches when
    ``|got - expected| <= atol + rtol * |expected|`` element-wise; for classification the
    predicted label must also equal ``label`` when it is set.
    """

    inputs: Mapping[str, Any]
    expected: Mapping[str, Any]
    atol: float = 1e-3
    rtol: float = 1e-3
    label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": dict(self.inputs),
            "expected": dict(self.expected),
            "atol": self.atol,
            "rtol": self.rtol,
        }
        if self.label is not None:
            out["label"] = self.label
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenSample:
        label = d.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise ContractError("golden label must be an integer")
        return cls(
            inputs=dict(req(d, "inputs", Mapping)),
            expected=dict(req(d, "expected", Mapping)),
            atol=req_float(d, "atol"),
            rtol=req_float(d, "rtol"),
            label=label,
        )


@dataclass(frozen=True)
class DeviceProfile:
    """What a device offers, checked against a bundle's compatibility block."""

    arch: str
    runtimes: Mapping[str, str]  # runtime name -> installed version
    accelerators: tuple[str, ...] = ("cpu",)
    # CPU feature flags (``/proc/cpuinfo``); None = not known, bundles' feature needs unchecked.
    cpu_features: frozenset[str] | None = None


@dataclass(frozen=True)
class Compatibility:
    """Where a bundle may run: runtime and minimum version, opset, CPU architectures, accelerator.

    ``arch`` lists accepted ``platform.machine()`` values after normalisation (``x86_64``,
    ``aarch64``, ``armv7l``); ``("any",)`` accepts all. ``cpu_features`` lists CPU features the
    device must offer (see ``contract.cpu``; empty, and absent from the JSON, for none).
    """

    runtime: str
    min_runtime_version: str
    arch: tuple[str, ...] = ("any",)
    accelerator: str = "cpu"
    opsets: Mapping[str, int] = field(default_factory=dict)
    cpu_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIME_FOR_FORMAT.values():
            raise ContractError(f"unknown runtime {self.runtime!r}")
        try:
            # packaging strips surrounding whitespace and has no length bound; a signed
            # field must be exact and short.
            v = self.min_runtime_version
            if v.strip() != v or len(v) > MAX_RUNTIME_VERSION_LENGTH:
                raise InvalidVersion(self.min_runtime_version)
            Version(self.min_runtime_version)
        except (InvalidVersion, AttributeError, TypeError) as exc:
            raise ContractError(f"bad min_runtime_version {self.min_runtime_version!r}") from exc
        if not self.arch:
            raise ContractError("compatibility.arch must list at least one architecture")
        validate_requirements(self.cpu_features)

    def check(self, device: DeviceProfile) -> None:
        """Raise IncompatibleTargetError unless ``device`` can run this bundle.

        Raises:
            IncompatibleTargetError: wrong architecture, missing or too old runtime, missing
                accelerator, or a CPU feature the device does not offer.
        """
        arch = normalise_arch(device.arch)
        if "any" not in self.arch and arch not in self.arch:
            raise IncompatibleTargetError(
                f"bundle is built for {', '.join(self.arch)}; this device is {arch}"
            )
        installed = device.runtimes.get(self.runtime)
        if installed is None:
            raise IncompatibleTargetError(f"bundle needs {self.runtime}, not installed here")
        try:
            too_old = Version(installed) < Version(self.min_runtime_version)
        except InvalidVersion as exc:
            raise IncompatibleTargetError(f"cannot compare runtime version {installed!r}") from exc
        if too_old:
            raise IncompatibleTargetError(
                f"bundle needs {self.runtime} >= {self.min_runtime_version}, device has {installed}"
            )
        if self.accelerator not in device.accelerators:
            raise IncompatibleTargetError(
                f"bundle needs accelerator {self.accelerator!r}; device offers "
                f"{', '.join(device.accelerators)}"
            )
        if self.cpu_features and device.cpu_features is not None:
            unmet = unmet_requirements(self.cpu_features, device.cpu_features)
            if unmet:
                raise IncompatibleTargetError(
                    f"bundle needs CPU features {', '.join(unmet)} that this device's CPU "
                    "lacks; build it for a portable target (--target x86 or arm64)"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "min_runtime_version": self.min_runtime_version,
            "arch": list(self.arch),
            "accelerator": self.accelerator,
            "opsets": dict(self.opsets),
            # Absent when empty: manifests without requirements keep their exact bytes.
            **({"cpu_features": list(self.cpu_features)} if self.cpu_features else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Compatibility:
        opsets = req(d, "opsets", Mapping)
        for k, v in opsets.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
                raise ContractError("compatibility.opsets maps domain names to integers")
        return cls(
            runtime=req_str(d, "runtime"),
            min_runtime_version=req_str(d, "min_runtime_version"),
            arch=tuple(str(a) for a in req_list(d, "arch")),
            accelerator=req_str(d, "accelerator"),
            opsets=dict(opsets),
            # Checked by ``__post_init__`` (``validate_requirements``), as any other way in.
            cpu_features=tuple(req_list(d, "cpu_features")) if "cpu_features" in d else (),
        )


def normalise_arch(machine: str) -> str:
    """Map ``platform.machine()`` spellings to one name per architecture."""
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}.get(m, m)


@dataclass(frozen=True)
class Provenance:
    """Where the model came from and what built it."""

    source_sha256: str
    source_format: str
    recipe: Mapping[str, Any]
    tool_versions: Mapping[str, str]
    built_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_sha256": self.source_sha256,
            "source_format": self.source_format,
            "recipe": dict(self.recipe),
            "tool_versions": dict(self.tool_versions),
            "built_at": self.built_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        return cls(
            source_sha256=req_str(d, "source_sha256"),
            source_format=req_str(d, "source_format"),
            recipe=dict(req(d, "recipe", Mapping)),
            tool_versions={str(k): str(v) for k, v in req(d, "tool_versions", Mapping).items()},
            built_at=req_str(d, "built_at"),
        )


@dataclass(frozen=True)
class BundleManifest:
    """The signed description of one model version. See ``docs/bundle-format.md``."""

    name: str
    version: int
    channel: str
    artifact: ArtifactRef
    inputs: InputContract
    outputs: OutputContract
    baseline: DriftBaseline
    compatibility: Compatibility
    provenance: Provenance
    golden: tuple[GoldenSample, ...] = ()
    report: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if not 1 <= self.version <= MAX_VERSION:
            raise ContractError(f"version must be a positive integer of at most {MAX_VERSION}")
        validate_name(self.channel, "channel")
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(
                f"manifest schema_version {self.schema_version} is not supported (this agent "
                f"reads {SCHEMA_VERSION})"
            )
        if RUNTIME_FOR_FORMAT[self.artifact.format] != self.compatibility.runtime:
            raise ContractError(
                f"{self.artifact.format} artifact cannot run on {self.compatibility.runtime}"
            )

    @property
    def target_path(self) -> str:
        """Path of this manifest in the signed targets metadata."""
        return f"{self.name}/{self.version}/manifest.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "channel": self.channel,
            "artifact": self.artifact.to_dict(),
            "inputs": self.inputs.to_dict(),
            "outputs": self.outputs.to_dict(),
            "baseline": self.baseline.to_dict(),
            "golden": [g.to_dict() for g in self.golden],
            "compatibility": self.compatibility.to_dict(),
            "provenance": self.provenance.to_dict(),
            "report": dict(self.report),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleManifest:
        """Parse a manifest dict.

        Raises:
            ContractError: a field is missing, of the wrong type or out of range.
        """
        if not isinstance(d, Mapping):
            raise ContractError("manifest must be a JSON object")
        schema_version = req_int(d, "schema_version")
        if schema_version != SCHEMA_VERSION:
            raise ContractError(f"manifest schema_version {schema_version} is not supported")
        return cls(
            schema_version=schema_version,
            name=req_str(d, "name"),
            version=req_int(d, "version"),
            channel=req_str(d, "channel"),
            artifact=ArtifactRef.from_dict(req(d, "artifact", Mapping)),
            inputs=InputContract.from_dict(req(d, "inputs", Mapping)),
            outputs=OutputContract.from_dict(req(d, "outputs", Mapping)),
            baseline=DriftBaseline.from_dict(req(d, "baseline", Mapping)),
            golden=tuple(GoldenSample.from_dict(g) for g in req_list(d, "golden")),
            compatibility=Compatibility.from_dict(req(d, "compatibility", Mapping)),
            provenance=Provenance.from_dict(req(d, "provenance", Mapping)),
            report=dict(req(d, "report", Mapping)),
        )

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes; these exact bytes are hashed and signed."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleManifest:
        """Parse canonical or plain JSON manifest bytes.

        Raises:
            ContractError: not UTF-8 JSON, larger than ``MAX_MANIFEST_BYTES``, beyond the
                limits of ``edge_agent.strict_json``, or not a valid manifest.
        """
        obj = strict_json.loads(data, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
        try:
            return cls.from_dict(obj)
        # A safety net at the byte boundary: from_dict raises ContractError for every problem
        # it knows of; a value that trips a library call (numpy, packaging) is still bad input.
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
            raise ContractError(f"manifest is invalid: {type(exc).__name__}: {exc}") from exc
