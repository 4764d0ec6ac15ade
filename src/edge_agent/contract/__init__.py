"""Wire contracts every role shares: the bundle manifest and the input/output contracts."""

from edge_agent.contract.inputs import (
    DimSpec,
    FeatureRanges,
    InputContract,
    OutputContract,
    Preprocessing,
    TensorSpec,
)
from edge_agent.contract.manifest import (
    SCHEMA_VERSION,
    ArtifactRef,
    BundleManifest,
    Compatibility,
    DeviceProfile,
    GoldenSample,
    Provenance,
    canonical_json,
    normalise_arch,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactRef",
    "BundleManifest",
    "Compatibility",
    "DeviceProfile",
    "DimSpec",
    "FeatureRanges",
    "GoldenSample",
    "InputContract",
    "OutputContract",
    "Preprocessing",
    "Provenance",
    "TensorSpec",
    "canonical_json",
    "normalise_arch",
]
