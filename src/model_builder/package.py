"""Packaging: a manifest and an artifact become a signed bundle.

Owns: turning a manifest + artifact into bundle bytes signed with the key store's targets keys,
and adding co-signatures to an existing bundle (for targets thresholds above one). The layout and
target paths come from ``edge_agent`` so every verifier agrees with what is written here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Targets

from edge_agent.bundle import bundle_bytes, read_raw, write_bundle
from edge_agent.contract import ArtifactRef, BundleManifest
from edge_agent.trust import make_targets, parse_metadata
from model_builder.errors import KeyStoreError
from model_builder.keystore import KeyStore


def artifact_ref(artifact: bytes, fmt: str) -> ArtifactRef:
    """The manifest's reference to ``artifact``: member path, SHA-256 and exact length."""
    return ArtifactRef(
        path=f"model.{fmt}",
        format=fmt,
        sha256=hashlib.sha256(artifact).hexdigest(),
        length=len(artifact),
    )


def package_bundle(
    manifest: BundleManifest,
    artifact: bytes,
    store: KeyStore,
    *,
    now: datetime,
    expires_days: int = 365,
    key_labels: Sequence[str] | None = None,
) -> bytes:
    """Sign ``manifest`` (which must reference ``artifact``) and return the bundle bytes.

    Raises:
        KeyStoreError: no usable targets key, or the manifest does not reference the artifact.
    """
    if artifact_ref(artifact, manifest.artifact.format) != manifest.artifact:
        raise KeyStoreError("refusing to sign: the manifest does not reference this artifact")
    manifest_bytes = manifest.to_bytes()
    targets = make_targets(manifest, manifest_bytes, now + timedelta(days=expires_days))
    targets_bytes = store.sign_targets(targets, key_labels)
    return bundle_bytes(targets_bytes, manifest_bytes, artifact, manifest.artifact.format)


def cosign_bundle(path: Path, store: KeyStore, key_labels: Sequence[str]) -> int:
    """Add signatures from ``key_labels`` to the bundle at ``path`` in place (atomically).

    Returns:
        The number of signatures the targets metadata now carries.

    Raises:
        BundleFormatError: the file is not a bundle.
        MetadataFormatError: its targets metadata is not TUF targets metadata.
        KeyStoreError: a key is not a current targets key.
    """
    raw = read_raw(path, with_artifact=True)
    if raw.artifact is None:  # pragma: no cover - with_artifact guarantees it
        raise KeyStoreError("bundle artifact could not be read")
    md: Metadata[Targets] = parse_metadata(raw.targets_bytes, Targets.type)
    for signer in store.signers_for("targets", key_labels):
        md.sign(signer, append=True)
    fmt = raw.artifact_name.rsplit(".", 1)[1]
    write_bundle(path, bundle_bytes(bytes(md.to_bytes()), raw.manifest_bytes, raw.artifact, fmt))
    return len(md.signatures)
