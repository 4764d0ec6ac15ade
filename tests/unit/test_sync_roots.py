"""The sync loop's root handling: the chain beside a desired state, over the in-memory transport.

The desired-state messages are made by the server's own code (``fleet_server.delivery.desired``);
the
agent is a real one over a real store (no model installed: only trust is exercised here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root

from edge_agent.common.memory import MemoryBroker
from edge_agent.config import AgentConfig, StoreConfig, SyncConfig
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from edge_agent.sync.loop import SyncAgent
from edge_agent.trust import TrustedRoot
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore
from support import DEVICE


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    now = datetime.now(UTC)
    ks = KeyStore.init(tmp_path / "keys", now=now)
    ks.rotate("targets", now=now, add=1)  # v2
    ks.rotate("root", now=now, add=1)  # v3: root-2 joins
    return ks


@pytest.fixture
def sync(tmp_path: Path, keys: KeyStore) -> Any:
    state = tmp_path / "state"
    config = AgentConfig(
        device_id="dev-1",
        store=StoreConfig(state_dir=str(state)),
        sync=SyncConfig(enabled=True),
    )
    store = ModelStore(state, TrustedRoot.from_bytes(keys.root_chain()[0]), DEVICE)
    agent = Agent(config, store)
    s = SyncAgent(config, agent, client=MemoryBroker().client("dev-1"))  # never connected
    yield s
    agent.close()


def _message(keys: KeyStore, version: int, roots: list[bytes]) -> bytes:
    state = make_desired_state("dev-1", version, {}, datetime.now(UTC), timedelta(hours=1))
    return sign_desired_state(state, [keys.signer("online-1")], roots)


def test_a_chain_beside_the_desired_state_is_walked_then_the_state_accepted(
    sync: Any, keys: KeyStore
) -> None:
    message = _message(keys, 1, keys.root_chain()[1:])
    sync._handle_desired(message)
    assert sync._store.root.version == 3
    assert sync.counts["root_rotations"] == 1
    assert sync.counts["desired_accepted"] == 1
    assert sync.status()["root_version"] == 3
    # The retained copy again (a reconnect): nothing happens twice, nothing is refused.
    sync._handle_desired(message)
    assert sync.counts["desired_rejected"] == 0
    assert sync.counts["root_rotations"] == 1
    # A later document with the same chain: versions already trusted are skipped.
    sync._handle_desired(_message(keys, 2, keys.root_chain()[1:]))
    assert sync.counts["desired_accepted"] == 2
    assert sync.counts["roots_rejected"] == 0


def test_a_refused_chain_changes_nothing_and_the_state_is_judged_alone(
    sync: Any, keys: KeyStore
) -> None:
    md = Metadata[Root].from_bytes(keys.root_chain()[2])
    md.signatures.clear()
    md.sign(keys.signer("root-2"), append=True)  # v3 signed only by the key v3 adds
    sync._handle_desired(_message(keys, 1, [keys.root_chain()[1], bytes(md.to_bytes())]))
    assert sync._store.root.version == 1
    assert sync.counts["roots_rejected"] == 1
    assert sync.counts["desired_accepted"] == 1  # the online key is in v1 too
    events = []
    while not sync._events.empty():
        events.append(sync._events.get_nowait())
    assert any(
        e["event"] == "desired_rejected" and "root chain refused" in str(e["detail"])
        for e in events
    )


def test_a_malformed_message_is_refused_and_counted(sync: Any) -> None:
    sync._handle_desired(b'{"roots": 7, "signed": {}, "signatures": []}')
    assert sync.counts["desired_rejected"] == 1
    assert sync._store.root.version == 1


@pytest.mark.parametrize(
    "saved",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting (RecursionError in a plain json.loads)
        b'{"signed": {"version": 1' + b"0" * 5000 + b"}}",  # past the int digit limit
        b'{"signed": {"version": 1e400}}',
        b'{"signed": []}',
        b"\xff not utf-8",
    ],
)
def test_a_damaged_saved_desired_state_never_blocks_the_next_one(
    sync: Any, keys: KeyStore, saved: bytes
) -> None:
    """A saved document that fails verification at start still counts for replay protection
    (its version, when readable); whatever it holds, the next valid document is accepted."""
    sync._desired_path.parent.mkdir(parents=True, exist_ok=True)
    sync._desired_path.write_bytes(saved)
    sync._load_accepted()
    sync._handle_desired(_message(keys, 1, []))
    assert sync.counts["desired_accepted"] == 1


def test_an_expired_saved_desired_state_still_counts_for_replays(sync: Any, keys: KeyStore) -> None:
    past = datetime.now(UTC) - timedelta(hours=3)
    state = make_desired_state("dev-1", 5, {}, past, timedelta(hours=1))
    sync._desired_path.parent.mkdir(parents=True, exist_ok=True)
    sync._desired_path.write_bytes(sign_desired_state(state, [keys.signer("online-1")], []))
    sync._load_accepted()  # expired: not applied, but its version is remembered
    sync._handle_desired(_message(keys, 5, []))
    assert (sync.counts["desired_accepted"], sync.counts["desired_rejected"]) == (0, 1)
    sync._handle_desired(_message(keys, 6, []))
    assert sync.counts["desired_accepted"] == 1
