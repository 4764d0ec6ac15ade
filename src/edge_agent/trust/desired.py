"""The signed desired-state document: which builder-signed bundle a device should run.

Pure: bytes in, a verified ``DesiredState`` or a typed error out; the clock is passed in.

Owns: the desired-state value object (``DesiredState``), its strict dict form, its signed wire
format (``encode_envelope``) and the check a device runs on the document before acting on it
(``verify_desired_state``). Does not own one model's entry in it and the checks of a downloaded
bundle against that entry (``ModelAssignment``, ``ShadowAssignment``, ``check_assignment``,
``check_targets_digest``, ``check_bundle_identity``, ``SHADOW_CAPABILITY``:
``edge_agent.trust.assignment``) nor the strict field checks both share
(``edge_agent.trust.fields``). The fleet server's *online* key (the root's ``timestamp`` role)
signs it; it names, per model, the exact bundle file (length and SHA-256) and the builder-signed
targets metadata that bundle must carry. It never makes a model trusted by itself.

Wire format (a TUF-style envelope, canonical JSON throughout)::

    {"signed": {"_type": "desired-state", "schema_version": 1, "device_id": "cam-7",
                "version": 12, "expires": "2026-06-01T01:00:00Z",
                "models": {"digits": {"version": 3, "channel": "stable",
                                      "bundle_sha256": "<hex>", "bundle_length": 123456,
                                      "targets_sha256": "<hex>"}}},
     "signatures": [{"keyid": "<hex>", "sig": "<hex>"}]}

A model may also carry a ``shadow`` object (issue 12: a rollout's shadow phase): a newer bundle
the device installs *without serving it* and runs beside the live model on a sample of requests::

    "shadow": {"version": 4, "channel": "stable", "bundle_sha256": "<hex>",
               "bundle_length": 123456, "targets_sha256": "<hex>", "fraction_ppm": 200000}

``fraction_ppm`` is the sampled share in parts per million (canonical JSON has no floats). The
shadow bundle is checked exactly like a serving one (signed length and digest, targets digest,
builder signatures, identity, and rollback protection on its version), and its version must be
newer than the serving one. The key is only present when a shadow is assigned: a document
without it is byte-for-byte the older form, and an older device (whose strict parser refuses
the key) is never sent one: the server sends it only to devices whose reported state lists the
``shadow`` capability (``trust.assignment.SHADOW_CAPABILITY``).

The document may also carry an ``agent`` object (issue 15: the agent's own software), the
agent release the device should run: ``{"release": 7, "bundle_sha256": "<hex>",
"bundle_length": 123456, "targets_sha256": "<hex>"}`` (``trust.agent_release.AgentAssignment``).
Like ``shadow`` it is only present when assigned, and only sent to devices whose reported
state lists the ``agent-update`` capability (``trust.agent_release.AGENT_UPDATE_CAPABILITY``).

Each signature is over the canonical JSON (securesystemslib ``encode_canonical``, as python-tuf
signs) of ``signed``; a threshold of the root's ``timestamp`` keys must have signed.

Device workflow, and why a compromised fleet server alone cannot install a model:

1. ``verify_desired_state``: threshold of online keys, not expired, addressed to this device,
   version strictly greater than the last accepted one (replay / rollback of the document).
2. Fetch each assigned bundle, reading at most ``ModelAssignment.bundle_length`` bytes (the
   signed transfer cap), then ``trust.assignment.check_assignment`` (exact length and SHA-256).
3. Verify the bundle itself with the builder keys exactly as for any bundle
   (``edge_agent.trust.verify.verify_bundle`` with ``expected_name``/``expected_channel`` and the
   installed version), optionally ``trust.assignment.check_targets_digest`` on its
   ``targets.json`` member, and ``trust.assignment.check_bundle_identity`` on the verified
   manifest.

Both checks must pass: the online key decides *which* signed model runs, the offline builder keys
decide what a model *is*. A stolen online key can at most point a device at another bundle the
builder signed that is not older than the installed one (the bundle check still refuses rollback);
a stolen builder key cannot push anything without an online signature.

Attack -> check -> error:
    malformed / wrong ``_type``       strict parse                  MetadataFormatError
    unknown key, builder (targets)    threshold of timestamp keys   SignatureThresholdError
      key, too few online keys
    tampered after signing            signature over canonical JSON SignatureThresholdError
    freeze (stale document replayed)  ``expires`` vs ``now``        ExpiredMetadataError
    replay / older document           version > last accepted       RollbackError
    document for another device       device id                     MixAndMatchError
    shadow not newer than serving,    strict parse                  MetadataFormatError
      bad fraction, unknown shadow key
    endless / wrong bundle            signed length and SHA-256     LengthMismatchError,
                                                                    DigestMismatchError
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from securesystemslib.signer import Signature

from edge_agent.errors import (
    ExpiredMetadataError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
)
from edge_agent.ids import DEVICE_ID_PATTERN, NAME_PATTERN
from edge_agent.trust import envelope
from edge_agent.trust.agent_release import AgentAssignment
from edge_agent.trust.assignment import ModelAssignment, ShadowAssignment
from edge_agent.trust.fields import exact_keys, int_field, str_field
from edge_agent.trust.root import TrustedRoot

__all__ = [
    "DESIRED_STATE_TYPE",
    "MAX_DESIRED_STATE_BYTES",
    "SCHEMA_VERSION",
    "SIGNING_ROLE",
    "DesiredState",
    # Re-exported for fleet_server.service, which imports them from here.
    "ModelAssignment",
    "ShadowAssignment",
    "encode_envelope",
    "verify_desired_state",
]

DESIRED_STATE_TYPE = "desired-state"
SCHEMA_VERSION = 1
SIGNING_ROLE = envelope.SIGNING_ROLE
MAX_DESIRED_STATE_BYTES = 256 * 1024
MAX_MODELS = 256
MAX_SIGNATURES = envelope.MAX_SIGNATURES
EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Device ids and model names: the one shared rules (edge_agent.ids), which the manifest uses
# too. Every pattern here is used with ``fullmatch`` (``str_field``).
DEVICE_ID_RE = DEVICE_ID_PATTERN
NAME_RE = NAME_PATTERN

_SIGNED_KEYS = frozenset({"_type", "schema_version", "device_id", "version", "expires", "models"})


@dataclass(frozen=True)
class DesiredState:
    """What one device should run, as signed by the fleet server's online key.

    Attributes:
        device_id: the single device this document is addressed to.
        version: per-device counter, strictly increasing (the anti-replay counter).
        expires: UTC expiry, whole seconds.
        models: model name -> assignment (read-only mapping; empty means "run no model").
        schema_version: wire schema version (only ``SCHEMA_VERSION`` is understood).

    Raises:
        MetadataFormatError: a field is out of range or badly formed (on construction).
    """

    device_id: str
    version: int
    expires: datetime
    models: Mapping[str, ModelAssignment] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    agent: AgentAssignment | None = None

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise MetadataFormatError(f"unsupported schema_version {self.schema_version!r}")
        str_field(self.device_id, "device_id", DEVICE_ID_RE)
        int_field(self.version, "version", minimum=1)
        if (
            not isinstance(self.expires, datetime)
            or self.expires.utcoffset() != timedelta(0)
            or self.expires.microsecond != 0
        ):
            raise MetadataFormatError("expires must be a UTC datetime in whole seconds")
        if not isinstance(self.models, Mapping) or len(self.models) > MAX_MODELS:
            raise MetadataFormatError(f"models must be a mapping of at most {MAX_MODELS} entries")
        for name, assignment in self.models.items():
            str_field(name, "model name", NAME_RE)
            if not isinstance(assignment, ModelAssignment):
                raise MetadataFormatError(f"model {name!r}: not a ModelAssignment")
        if self.agent is not None and not isinstance(self.agent, AgentAssignment):
            raise MetadataFormatError("agent must be an AgentAssignment")
        object.__setattr__(self, "expires", self.expires.astimezone(UTC))
        object.__setattr__(self, "models", MappingProxyType(dict(sorted(self.models.items()))))

    def __hash__(self) -> int:
        return hash(
            (
                self.schema_version,
                self.device_id,
                self.version,
                self.expires,
                self.agent,
                *self.models.items(),
            )
        )

    def is_expired(self, now: datetime) -> bool:
        """True when ``now`` is at or past ``expires``."""
        return now >= self.expires

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` part of the envelope."""
        out: dict[str, Any] = {
            "_type": DESIRED_STATE_TYPE,
            "schema_version": self.schema_version,
            "device_id": self.device_id,
            "version": self.version,
            "expires": self.expires.strftime(EXPIRES_FORMAT),
            "models": {name: a.to_dict() for name, a in self.models.items()},
        }
        if self.agent is not None:  # absent, not null: the older form stays byte-identical
            out["agent"] = self.agent.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object) -> DesiredState:
        """Parse the ``signed`` part strictly.

        Raises:
            MetadataFormatError: wrong ``_type``, missing, unknown or invalid fields.
        """
        has_agent = isinstance(data, dict) and "agent" in data
        d = exact_keys(
            data, _SIGNED_KEYS | {"agent"} if has_agent else _SIGNED_KEYS, "desired state"
        )
        if d["_type"] != DESIRED_STATE_TYPE:
            raise MetadataFormatError(f"expected {DESIRED_STATE_TYPE} metadata, got {d['_type']!r}")
        expires = d["expires"]
        if not isinstance(expires, str):
            raise MetadataFormatError("expires must be a string")
        try:
            when = datetime.strptime(expires, EXPIRES_FORMAT).replace(tzinfo=UTC)
        except ValueError as exc:
            raise MetadataFormatError(f"expires {expires!r} is not {EXPIRES_FORMAT}") from exc
        models = d["models"]
        if not isinstance(models, dict):
            raise MetadataFormatError("models must be a JSON object")
        return cls(
            schema_version=d["schema_version"],
            device_id=d["device_id"],
            version=d["version"],
            expires=when,
            models={name: ModelAssignment.from_dict(a) for name, a in models.items()},
            agent=AgentAssignment.from_dict(d["agent"]) if has_agent else None,
        )

    def signed_bytes(self) -> bytes:
        """Canonical JSON of ``to_dict()``: the bytes every signature covers."""
        return envelope.canonical(self.to_dict())


def encode_envelope(state: DesiredState, signatures: list[Signature]) -> bytes:
    """The wire bytes: canonical JSON of ``{"signed": ..., "signatures": [...]}``.

    Raises:
        MetadataFormatError: two signatures carry the same key id.
    """
    return envelope.encode_envelope(state.to_dict(), signatures)


def verify_desired_state(
    root: TrustedRoot,
    data: bytes,
    *,
    now: datetime,
    device_id: str,
    last_version: int,
) -> DesiredState:
    """Verify a desired-state document as this device must before acting on it.

    Args:
        root: the device's current trusted root (after any rotation).
        data: the envelope bytes as received.
        now: the reference time (timezone-aware).
        device_id: this device's id.
        last_version: the version of the last desired state this device accepted (0 if none).
            The caller persists the returned ``version`` after acting on the document.

    Returns:
        The verified desired state.

    Raises:
        MetadataFormatError: oversized, not JSON, wrong ``_type``, or missing/unknown/invalid
            fields, duplicate signatures.
        SignatureThresholdError: fewer valid signatures than the ``timestamp`` threshold from
            keys the root lists for ``timestamp`` (builder keys and unknown keys do not count).
        ExpiredMetadataError: the root or the document has expired at ``now``.
        MixAndMatchError: the document is addressed to another device.
        RollbackError: ``version`` is not greater than ``last_version`` (replay or older).
    """
    state, payload, sigs = envelope.parse_envelope(
        data,
        max_bytes=MAX_DESIRED_STATE_BYTES,
        what="desired state",
        parse=DesiredState.from_dict,
        signed_bytes=DesiredState.signed_bytes,
    )
    envelope.verify_signatures(root, payload, sigs, "desired state")
    root.check_expiry(now)
    if state.is_expired(now):
        raise ExpiredMetadataError(f"desired state v{state.version} expired at {state.expires}")
    if not hmac.compare_digest(state.device_id.encode(), device_id.encode()):
        raise MixAndMatchError(
            f"desired state is addressed to {state.device_id!r}, this device is {device_id!r}"
        )
    if state.version <= last_version:
        raise RollbackError(
            f"desired state v{state.version} is not newer than accepted v{last_version}"
        )
    return state
