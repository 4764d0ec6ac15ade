"""Bundle files: the on-disk layout and capped, verifying reads."""

from edge_agent.bundle.archive import (
    BUNDLE_SUFFIX,
    LoadedBundle,
    RawBundle,
    bundle_bytes,
    read_bundle,
    read_raw,
    sha256_file,
    write_bundle,
)

__all__ = [
    "BUNDLE_SUFFIX",
    "LoadedBundle",
    "RawBundle",
    "bundle_bytes",
    "read_bundle",
    "read_raw",
    "sha256_file",
    "write_bundle",
]
