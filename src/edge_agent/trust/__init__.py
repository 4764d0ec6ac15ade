"""Trust: the device's root of keys and the pure verification of signed bundles."""

from edge_agent.trust.root import ROLES, TrustedRoot, parse_metadata
from edge_agent.trust.rotation import (
    RootChoice,
    apply_root_chain,
    attach_roots,
    choose_root,
    split_roots,
    walk_root_chain,
)
from edge_agent.trust.verify import (
    ArtifactDigest,
    VerifiedManifest,
    VerifiedTargets,
    artifact_target_path,
    make_targets,
    manifest_target_path,
    verify_artifact,
    verify_bundle,
    verify_manifest,
    verify_signed_manifest,
    verify_targets,
)

__all__ = [
    "ROLES",
    "ArtifactDigest",
    "RootChoice",
    "TrustedRoot",
    "VerifiedManifest",
    "VerifiedTargets",
    "apply_root_chain",
    "artifact_target_path",
    "attach_roots",
    "choose_root",
    "make_targets",
    "manifest_target_path",
    "parse_metadata",
    "split_roots",
    "verify_artifact",
    "verify_bundle",
    "verify_manifest",
    "verify_signed_manifest",
    "verify_targets",
    "walk_root_chain",
]
