"""Build and sign desired-state documents with the fleet server's online key.

Owns: choosing the expiry and producing the signed wire bytes. The document format, and the
checks a device runs on it, live in ``edge_agent.trust.desired`` (the shared contract).

The online key signs which builder-signed bundle a device should run; it never makes a model
trusted by itself (the device still verifies every bundle with the builder keys).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from securesystemslib.signer import Signer

from edge_agent.errors import MetadataFormatError
from edge_agent.strict_json import loads as strict_loads
from edge_agent.trust.agent_release import AgentAssignment
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.trust.desired import DesiredState, encode_envelope
from edge_agent.trust.rotation import attach_roots

__all__ = ["DEFAULT_TTL", "make_desired_state", "sign_desired_state"]

DEFAULT_TTL = timedelta(hours=24)


def make_desired_state(
    device_id: str,
    version: int,
    models: Mapping[str, ModelAssignment],
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
    *,
    agent: AgentAssignment | None = None,
) -> DesiredState:
    """A desired state for one device that expires ``ttl`` after ``now`` (whole seconds).

    Args:
        device_id: the device the document is addressed to.
        version: the next per-device version (strictly greater than any sent before).
        models: model name -> assignment; empty means "run no model".
        now: the reference time (timezone-aware).
        ttl: lifetime of the document; keep it short (minutes to a day): it bounds freeze attacks.
        agent: the agent release the device should run (None: none assigned).

    Returns:
        The unsigned desired state.

    Raises:
        ValueError: ``ttl`` is not positive or ``now`` is naive.
        MetadataFormatError: a field is invalid (device id, version, model name...).
    """
    if ttl <= timedelta(0):
        raise ValueError(f"ttl must be positive, got {ttl}")
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    expires = (now + ttl).replace(microsecond=0)
    return DesiredState(
        device_id=device_id, version=version, expires=expires, models=models, agent=agent
    )


def sign_desired_state(
    state: DesiredState, signers: Sequence[Signer], roots: Sequence[bytes] = ()
) -> bytes:
    """Sign ``state`` with each signer (e.g. ``KeyStore.signer("online-1")``) and encode it.

    Args:
        state: the document to sign.
        signers: online (``timestamp`` role) signers; enough of them to reach the threshold.
        roots: root versions after v1 (``ServerRoots.chain()``), carried beside the envelope
            so a device rotates its root before it judges the document (which may be signed
            by a key only the newer root lists). Root metadata is self-authenticating: the
            online signature does not cover it. Empty: the plain envelope.

    Returns:
        The message to publish (canonical JSON).

    Raises:
        ValueError: no signer given.
        MetadataFormatError: two signers share a key, or a root is not JSON.
    """
    if not signers:
        raise ValueError("at least one signer is needed")
    payload = state.signed_bytes()
    return attach_roots(encode_envelope(state, [s.sign(payload) for s in signers]), roots)


def parse_document(document: bytes) -> DesiredState:
    """The ``signed`` part of a stored desired-state envelope (the server's own output).

    Raises:
        MetadataFormatError: the bytes are not a desired-state envelope.
    """
    env = strict_loads(
        document, max_bytes=len(document), what="stored desired state", error=MetadataFormatError
    )
    if not isinstance(env, dict) or "signed" not in env:
        raise MetadataFormatError("stored desired state has no signed part")
    return DesiredState.from_dict(env["signed"])
