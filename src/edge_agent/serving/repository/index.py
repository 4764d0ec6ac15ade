"""The repository index of one model: each kept version, its state and why (pure).

Owns the mapping from what the store keeps (``ModelState``: active version, statuses, the down
record) and what serves now (the registry's entries, the version policy's set, an operator's
unload, loads in progress and failures) onto the protocol's index entries: ``READY`` (answers
requests), ``UNAVAILABLE`` (kept, but does not answer; the reason says why) and ``LOADING``. No
I/O: ``edge_agent.serving.repository.control`` gathers the facts.

Does not own which versions the policy serves (``edge_agent.serving.routing.served_versions``)
nor loading anything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.store import ModelState

__all__ = ["LOADING", "READY", "UNAVAILABLE", "IndexEntry", "index_of"]

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"

#: Reasons of UNAVAILABLE entries (stable text; a down or failure reason follows the colon).
UNLOADED_REASON = "unloaded through the repository API"
OUTSIDE_POLICY = "outside the version policy ([serving] version_policy)"
STAGED_REASON = "staged: a rollout's shadow, it never answers a client"
NOT_LOADED = "not loaded"


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index, as the protocol spells it (``version`` a string)."""

    name: str
    version: str
    state: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": self.state,
                "reason": self.reason}  # fmt: skip


def index_of(
    state: ModelState,
    *,
    serving: int | None,
    pinned: Collection[int],
    served: Collection[int],
    unloaded: bool,
    loading: Collection[int] = (),
    failures: Mapping[int, str] | None = None,
) -> list[IndexEntry]:
    """The index entries of one model, oldest version first.

    Args:
        state: the store's record of the model.
        serving: the version answering unversioned requests now (the registry's entry; it may
            be an older version than ``state.active`` when the active one cannot load).
        pinned: other versions loaded and reachable by number (the version policy's, or a
            configured candidate's).
        served: the versions the version policy serves (loaded or not).
        unloaded: an operator unloaded the model: every version is UNAVAILABLE.
        loading: versions being loaded for the version policy now.
        failures: versions the version policy could not load, with why.
    """
    failed = failures or {}
    out = []
    for rec in state.versions:
        v = rec.version
        if unloaded:
            entry = (UNAVAILABLE, UNLOADED_REASON)
        elif v == serving or v in pinned:
            entry = (READY, "")
        elif v in loading:
            entry = (LOADING, "")
        elif v == state.active:
            down = state.down
            why = down.reason if down is not None and down.version == v else NOT_LOADED
            entry = (UNAVAILABLE, why)
        elif rec.status == "failed":
            entry = (UNAVAILABLE, f"failed on this device: {rec.reason}")
        elif rec.status == "staged":
            entry = (UNAVAILABLE, STAGED_REASON)
        elif v in failed:
            entry = (UNAVAILABLE, f"load failed: {failed[v]}")
        else:
            entry = (UNAVAILABLE, NOT_LOADED if v in served else OUTSIDE_POLICY)
        out.append(IndexEntry(state.name, str(v), *entry))
    return out
