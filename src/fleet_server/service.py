"""The fleet service: what an operator can ask of the server, orchestrated over its parts.

``FleetService`` ties the registry (state), the bundle library (verified files), the gateway
(MQTT delivery) and the online signers (desired state) together. It decides nothing about trust
itself: bundles are judged by ``edge_agent.trust`` (via the library) and documents are built and
signed by ``fleet_server.delivery.desired``. It is what the admin API calls, and what unit tests
drive
with a SQLite registry and a fake gateway.

Assigning a model to a device writes a new desired-state document that keeps every other model
the device is currently assigned (read from its latest document inside the registry's locked
transaction, so concurrent assignments cannot drop each other's models), stores it under the
next per-device version, then hands it to the gateway, which publishes it retained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from securesystemslib.signer import Signer

from edge_agent.errors import EdgefleetError, RootRotationError
from edge_agent.trust import TrustedRoot
from edge_agent.trust.agent_release import AGENT_UPDATE_CAPABILITY, AgentAssignment
from edge_agent.trust.desired import (
    SIGNING_ROLE,
    DesiredState,
    ModelAssignment,
    ShadowAssignment,
)
from edge_agent.wire.telemetry import StatusMessage
from fleet_server.delivery.desired import make_desired_state, parse_document, sign_desired_state
from fleet_server.delivery.library import BundleLibrary, LibraryEntry
from fleet_server.errors import ModelNotPublishedError, UnknownGroupError
from fleet_server.gateway.misbehaviour import DeviceMisbehaviour
from fleet_server.pki.roots import ServerRoots
from fleet_server.registry import labels as label_store
from fleet_server.registry import rollouts as rollout_store
from fleet_server.registry.labels import DeviceLabels
from fleet_server.registry.ops import agent_releases
from fleet_server.registry.ops.agent_releases import AgentReleaseRecord
from fleet_server.registry.store import Registry
from fleet_server.registry.values import (
    BundleRecord,
    DeviceFilter,
    DeviceRecord,
    SeqState,
    StoredTelemetry,
)
from fleet_server.registry.version_history import VersionHistory, version_history
from fleet_server.rollouts.admission import admit
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.shadow_evidence import shadow_capable

__all__ = [
    "AssignResult",
    "DeviceView",
    "FleetService",
    "FleetStatus",
    "GatewayPort",
]

log = logging.getLogger(__name__)


class GatewayPort(Protocol):
    """What the service needs of ``fleet_server.gateway.gateway.Gateway`` (fakes implement this)."""

    def publish_desired(self, device_id: str, document: bytes) -> None: ...

    def start_wave(self, sha256: str) -> str: ...

    def stats(self) -> object: ...

    def online(self) -> Mapping[str, StatusMessage]: ...

    def misbehaviour(
        self, device_id: str | None = None, *, top: int = 20
    ) -> Sequence[DeviceMisbehaviour]: ...


@dataclass(frozen=True)
class AssignResult:
    """What happened for one device: the stored desired version, and whether MQTT took it."""

    device_id: str
    desired_version: int
    published: bool
    error: str | None = None


@dataclass(frozen=True)
class DeviceView:
    """One device as an operator sees it."""

    record: DeviceRecord
    desired: DesiredState | None
    online: StatusMessage | None
    seq: SeqState | None = None
    labels: DeviceLabels | None = None


@dataclass(frozen=True)
class FleetStatus:
    """Fleet-wide counts and the gateway's counters."""

    devices: int
    active: int
    online: int
    bundles: int
    gateway: Mapping[str, int]


class FleetService:
    """Operator actions over the registry, bundle library, gateway and online signers."""

    def __init__(
        self,
        registry: Registry,
        library: BundleLibrary,
        gateway: GatewayPort,
        signers: Sequence[Signer],
        *,
        clock: Callable[[], datetime],
        ttl: timedelta,
        roots: ServerRoots | None = None,
    ) -> None:
        """Wire the parts; ``clock`` returns timezone-aware now, ``ttl`` bounds each document.

        ``roots``: the root chain shipped beside every desired state (None: none shipped).
        """
        self._roots = roots
        self._registry = registry
        self._library = library
        self._gateway = gateway
        self._signers = list(signers)
        self._clock = clock
        self._ttl = ttl

    # ----------------------------------------------------------------- models
    def publish_model(self, path: Path) -> BundleRecord:
        """Verify a bundle file with the builder root, store it and record it.

        Raises:
            BundleRejectedError: unreadable or not trusted by the builder root.
            LibraryError: the library directory failed.
            BundleExistsError: this name and version is published with different bytes.
            RegistryError: the registry refused or failed.
        """
        entry = self._library.add(path)
        return self._record(entry)

    def publish_model_bytes(self, data: bytes) -> BundleRecord:
        """As ``publish_model``, for bundle bytes (an admin API upload).

        Raises:
            BundleRejectedError: not a bundle or not trusted by the builder root.
            LibraryError: the library directory failed.
            BundleExistsError: this name and version is published with different bytes.
            RegistryError: the registry refused or failed.
        """
        entry = self._library.add_bytes(data)
        return self._record(entry)

    def _record(self, entry: LibraryEntry) -> BundleRecord:
        return self._registry.publish_bundle(
            entry.name,
            entry.version,
            channel=entry.channel,
            sha256=entry.sha256,
            length=entry.length,
            targets_sha256=entry.targets_sha256,
            manifest=entry.manifest,
        )

    # ----------------------------------------------------------------- the agent's software
    def publish_agent_bytes(self, data: bytes) -> AgentReleaseRecord:
        """Verify an agent package (``*.efa``) with the builder root, store and record it.

        Raises:
            BundleRejectedError: not an agent package or not trusted by the builder root.
            LibraryError: the library directory failed.
            BundleExistsError: this release number is published with different bytes.
            RegistryError: the registry refused or failed.
        """
        e = self._library.add_agent_bytes(data)
        record = AgentReleaseRecord(
            e.release, e.version, e.python, e.sha256, e.length, e.targets_sha256, self._clock()
        )
        return agent_releases.publish_agent_release(self._registry, record)

    def list_agent_releases(self) -> list[AgentReleaseRecord]:
        """Published agent releases, newest first. Raises RegistryUnavailableError."""
        return agent_releases.list_agent_releases(self._registry)

    def assign_agent(self, target: str, release: int, *, group: bool = False) -> list[AssignResult]:
        """Assign agent ``release`` to a device, or to every active device of a group.

        Each device keeps its models. Only devices whose reported state lists the
        ``agent-update`` capability (a launcher runs them) are sent it; the others get a
        result with ``published=False`` and the reason, and nothing is stored for them.

        Raises:
            ModelNotPublishedError: the release is not published, or its file is missing.
            UnknownGroupError, UnknownDeviceError, DeviceRevokedError,
            RegistryUnavailableError: as ``assign``.
        """
        record = agent_releases.agent_release(self._registry, release)
        if not self._library.has(record.sha256):
            raise ModelNotPublishedError(f"agent release {release} has no stored file")
        assignment = AgentAssignment(
            record.release, record.sha256, record.length, record.targets_sha256
        )
        if group:
            devices = self._registry.list_devices(group=target, include_revoked=False)
            if not devices:
                raise UnknownGroupError(f"no active device in group {target!r}")
        else:
            devices = [self._registry.get_device(target)]
        results = []
        for device in devices:
            caps = (device.reported or {}).get("capabilities")
            if not isinstance(caps, list) or AGENT_UPDATE_CAPABILITY not in caps:
                results.append(
                    AssignResult(device.id, 0, published=False, error="not agent-update capable")
                )
                continue
            results.append(self._assign_one(device.id, None, None, agent=assignment))
        return results

    def list_models(self, name: str | None = None) -> list[BundleRecord]:
        """Published bundles ordered by name and version.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return self._registry.list_bundles(name)

    def model_history(self, name: str | None = None) -> dict[tuple[str, int], VersionHistory]:
        """Aborts, quarantine and overrides of every version rolled out (of ``name``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return version_history(self._registry, name)

    def model(self, name: str, version: int) -> BundleRecord:
        """One published bundle.

        Raises:
            ModelNotPublishedError: no such name and version.
            RegistryUnavailableError: the database failed.
        """
        for record in self._registry.list_bundles(name):
            if record.version == version:
                return record
        raise ModelNotPublishedError(f"model {name} v{version} is not published")

    # ----------------------------------------------------------------- assignment
    def assign(
        self, target: str, name: str, version: int, *, group: bool = False
    ) -> list[AssignResult]:
        """Assign model ``name`` v``version`` to a device, or to every active device of a group.

        Each device keeps its other assigned models. A revoked device is refused when named
        directly and skipped in a group.

        Returns:
            One result per device, in device-id order.

        Raises:
            ModelNotPublishedError: the model version is not published, or its file is missing.
            UnknownGroupError: ``group`` is set and no active device is in it.
            UnknownDeviceError: the device is not enrolled.
            DeviceRevokedError: the named device is revoked.
            RegistryUnavailableError: the database failed.
        """
        assignment = self._assignment(name, version)
        if group:
            ids = [d.id for d in self._registry.list_devices(group=target, include_revoked=False)]
            if not ids:
                raise UnknownGroupError(f"no active device in group {target!r}")
        else:
            ids = [self._registry.get_device(target).id]
        return [self._assign_one(device_id, name, assignment) for device_id in ids]

    def operator_assign(
        self,
        target: str,
        name: str,
        version: int,
        *,
        group: bool = False,
        override_quarantine: str = "",
        override_aborted: str = "",
    ) -> list[AssignResult]:
        """``assign`` as an operator asks for it (admin API, CLI): memory of failure applies.

        A direct assignment skips a rollout's waves and gates, so a version a rollout aborted,
        or a quarantined one, is refused exactly as ``rollouts create`` refuses it, unless the
        operator gives the same override and its reason (logged with the assignment).

        Raises:
            QuarantinedVersionError: the version is quarantined and not overridden.
            AbortedVersionError: a rollout of the version was aborted and it is not overridden.
            RolloutPolicyError: an override reason is unprintable or too long.
            ModelNotPublishedError, UnknownGroupError, UnknownDeviceError, DeviceRevokedError,
            RegistryUnavailableError: as ``assign``.
        """
        overrides = admit(
            name,
            version,
            quarantine_reason=rollout_store.quarantine_reason(self._registry, name, version),
            aborts=rollout_store.abort_count(self._registry, name, version),
            override_quarantine=override_quarantine,
            override_aborted=override_aborted,
        )
        results = self.assign(target, name, version, group=group)
        for o in overrides:
            log.warning(
                "direct assignment of %s v%d to %s %r overrides its %s history: %s",
                name,
                version,
                "group" if group else "device",
                target,
                o.kind,
                o.reason,
            )
        return results

    def assign_shadow(
        self, device_id: str, name: str, version: int, shadow: int, fraction_ppm: int
    ) -> AssignResult | None:
        """Assign ``name`` v``version`` serving and v``shadow`` as its shadow to one device.

        The shadow is installed without serving and replayed on ``fraction_ppm`` parts per
        million of requests (a rollout's shadow phase). Only a device whose reported state
        lists the ``shadow`` capability is sent one: an older device refuses the document's
        new key. A later ``assign`` of the model replaces the assignment and so ends the shadow.

        Returns:
            The result, or None when the device does not list the ``shadow`` capability
            (nothing is stored or sent).

        Raises:
            ModelNotPublishedError: either version is not published, or its file is missing.
            UnknownDeviceError, DeviceRevokedError, RegistryUnavailableError: as ``assign``.
        """
        device = self._registry.get_device(device_id)
        if not shadow_capable(device.reported):
            return None
        serving = self._assignment(name, version)
        candidate = self._assignment(name, shadow)
        assignment = replace(
            serving,
            shadow=ShadowAssignment(
                version=candidate.version,
                channel=candidate.channel,
                bundle_sha256=candidate.bundle_sha256,
                bundle_length=candidate.bundle_length,
                targets_sha256=candidate.targets_sha256,
                fraction_ppm=fraction_ppm,
            ),
        )
        return self._assign_one(device.id, name, assignment)

    def _assignment(self, name: str, version: int) -> ModelAssignment:
        record = self.model(name, version)
        if not self._library.has(record.sha256):
            raise ModelNotPublishedError(
                f"model {name} v{version} is recorded but its file {record.sha256} is missing"
            )
        return ModelAssignment(
            version=record.version,
            channel=record.channel,
            bundle_sha256=record.sha256,
            bundle_length=record.length,
            targets_sha256=record.targets_sha256,
        )

    def _assign_one(
        self,
        device_id: str,
        name: str | None,
        assignment: ModelAssignment | None,
        *,
        agent: AgentAssignment | None = None,
    ) -> AssignResult:
        """Store and publish the device's next document (``name`` None: same models again;
        the agent assignment is kept unless ``agent`` replaces it)."""

        def build(version: int) -> bytes:
            previous = self._registry.latest_desired(device_id)
            models: dict[str, ModelAssignment] = {}
            kept_agent = None
            if previous is not None:
                before = parse_document(previous.document)
                models.update(before.models)
                kept_agent = before.agent
            if name is not None and assignment is not None:
                models[name] = assignment
            state = make_desired_state(
                device_id,
                version,
                models,
                self._clock(),
                self._ttl,
                agent=agent if agent is not None else kept_agent,
            )
            chain = self._roots.chain() if self._roots is not None else ()
            return sign_desired_state(state, self._signers, chain)

        stored = self._registry.assign_desired(device_id, build)
        try:
            self._gateway.publish_desired(device_id, stored.document)
        except EdgefleetError as exc:
            # Stored is what counts: the document is re-published when the device reconnects.
            log.warning("desired v%d for %s not published: %s", stored.version, device_id, exc)
            return AssignResult(device_id, stored.version, published=False, error=str(exc))
        return AssignResult(device_id, stored.version, published=True)

    # ----------------------------------------------------------------- root of trust
    @property
    def roots(self) -> ServerRoots | None:
        """The root chain this service ships (None when built without one)."""
        return self._roots

    def root(self) -> TrustedRoot | None:
        """The current root (None when the service was built without one)."""
        return None if self._roots is None else self._roots.current

    def rotate_root(self, chain: Sequence[bytes]) -> tuple[TrustedRoot, list[AssignResult]]:
        """Accept newer root versions, verify bundles with the newest, ship the chain to devices.

        Each version must pass the devices' own rule (N+1, signed by the old and the new root
        thresholds; the final one unexpired), and the new root must still list this server's
        online keys for ``timestamp`` (or every device would refuse what it signs next). Then
        every active device with a desired state gets its next version (same models) carrying
        the chain, so it rotates without waiting for an assignment.

        Returns:
            The current root and one result per device re-published (empty when nothing new).

        Raises:
            MetadataFormatError, RootRotationError, ExpiredMetadataError: refused; nothing
                stored.
            LibraryError: no root chain is configured here.
            RegistryUnavailableError: the database failed.
        """
        if self._roots is None:
            raise RootRotationError("this server was started without a root chain")
        before = self._roots.current
        root = self._roots.rotate(chain, self._check_online_keys)
        if root is before:
            return root, []
        self._library.use_root(root)
        results = []
        for device in self._registry.list_devices(include_revoked=False):
            if self._registry.latest_desired(device.id) is not None:
                results.append(self._assign_one(device.id, None, None))
        return root, results

    def _check_online_keys(self, root: TrustedRoot) -> None:
        mine = {s.public_key.keyid for s in self._signers}
        listed = mine & set(root.keyids(SIGNING_ROLE))
        if len(listed) < root.threshold(SIGNING_ROLE):
            raise RootRotationError(
                f"root v{root.version} does not list enough of this server's online keys for "
                f"{SIGNING_ROLE} ({len(listed)} of threshold {root.threshold(SIGNING_ROLE)}): "
                "devices would refuse every desired state it signs; restart the server with "
                "the new online key first"
            )

    def start_wave(self, sha256: str) -> str:
        """Broadcast a published bundle's blocks once; returns the wave id.

        Raises:
            ModelNotPublishedError: no published bundle has this digest.
            TransportError: the gateway could not start the broadcast.
        """
        published = {b.sha256 for b in self._registry.list_bundles()}
        published |= {a.sha256 for a in agent_releases.list_agent_releases(self._registry)}
        if sha256 not in published:
            raise ModelNotPublishedError(f"no published bundle has sha256 {sha256!r}")
        return self._gateway.start_wave(sha256)

    # ----------------------------------------------------------------- devices
    def enroll_device(
        self,
        device_id: str,
        *,
        group: str = "default",
        tags: Mapping[str, object] | None = None,
        cert_serial: str | None = None,
    ) -> DeviceRecord:
        """Register a device (its certificate comes from the fleet CA, ``fleet-server devices``).

        Raises:
            RegistryError: invalid device id or group.
            DeviceExistsError: the device is enrolled and not revoked.
            RegistryUnavailableError: the database failed.
        """
        return self._registry.enroll(device_id, group=group, tags=tags, cert_serial=cert_serial)

    def revoke_device(self, device_id: str) -> DeviceRecord:
        """Mark a device revoked: nothing new is assigned to it (its certificate is the CA's job).

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        return self._registry.revoke(device_id)

    def devices(
        self,
        group: str | None = None,
        *,
        selector: LabelSelector | None = None,
        label_group: str | None = None,
    ) -> list[DeviceView]:
        """Every device (optionally of one group, matching a label selector or a label group's
        selector: one indexed query) with its desired state and online status.

        Raises:
            UnknownLabelGroupError: ``label_group`` is not defined.
            RegistryUnavailableError: the database failed.
        """
        if label_group is not None:
            selector = label_store.group(self._registry, label_group).selector
        if selector is None:
            records = self._registry.list_devices(group=group)
        else:
            records = label_store.select_devices(self._registry, selector)
            records = [r for r in records if group is None or r.group == group]
        online = self._gateway.online()
        return [DeviceView(r, self._desired(r.id), online.get(r.id)) for r in records]

    def device_page(
        self, query: DeviceFilter, *, state: str | None = None
    ) -> tuple[list[DeviceView], int]:
        """One page of devices (``Registry.device_page``: filtered and counted in SQL) with
        their desired state and online status, and how many match in all; ``state``
        ``"online"``/``"offline"`` selects by the gateway's presence.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        online = self._gateway.online()
        if state in ("online", "offline"):
            ids = frozenset(d for d, st in online.items() if st.state == "online")
            query = replace(query, online_ids=ids, exclude_online=state == "offline")
        records, total = self._registry.device_page(query)
        return [DeviceView(r, self._desired(r.id), online.get(r.id)) for r in records], total

    def device(self, device_id: str) -> DeviceView:
        """One device with its desired state, telemetry sequence state, online status and
        labels by source.

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        record = self._registry.get_device(device_id)
        return DeviceView(
            record,
            self._desired(device_id),
            self._gateway.online().get(device_id),
            self._registry.seq_state(device_id),
            label_store.device_labels(self._registry, device_id),
        )

    def _desired(self, device_id: str) -> DesiredState | None:
        latest = self._registry.latest_desired(device_id)
        return None if latest is None else parse_document(latest.document)

    def misbehaviour(
        self, device_id: str | None = None, *, top: int = 20
    ) -> list[DeviceMisbehaviour]:
        """Refusals per device counted by this worker's gateway: one device's, or the ``top``
        worst (most first)."""
        return list(self._gateway.misbehaviour(device_id, top=top))

    def telemetry(
        self, *, after_id: int | None = None, device_id: str | None = None, limit: int = 100
    ) -> list[StoredTelemetry]:
        """Stored telemetry with ``id > after_id``, oldest first (at most ``limit``, <= 10000);
        without ``after_id``, the newest ``limit`` entries (oldest of them first).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return self._registry.telemetry(device_id=device_id, after_id=after_id, limit=limit)

    def status(self) -> FleetStatus:
        """Counts of devices, online devices and bundles, and the gateway's counters.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        devices = self._registry.list_devices()
        online = self._gateway.online()
        stats = self._gateway.stats()
        counters: dict[str, int] = {}
        if is_dataclass(stats) and not isinstance(stats, type):
            for key, value in asdict(stats).items():
                if isinstance(value, Mapping):  # e.g. messages by kind -> messages_<kind>
                    counters.update({f"{key}_{k}": int(v) for k, v in value.items()})
                elif isinstance(value, int | float):
                    counters[key] = int(value)
        return FleetStatus(
            devices=len(devices),
            active=sum(1 for d in devices if not d.revoked),
            online=sum(1 for s in online.values() if s.state == "online"),
            bundles=len(self._registry.list_bundles()),
            gateway=counters,
        )
