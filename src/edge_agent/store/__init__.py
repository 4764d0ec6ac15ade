"""The device's model store: verified installs, atomic activation, rollback, verified loads."""

from edge_agent.store.state import ModelState, VersionRecord
from edge_agent.store.store import InstallResult, ModelStore

__all__ = ["InstallResult", "ModelState", "ModelStore", "VersionRecord"]
