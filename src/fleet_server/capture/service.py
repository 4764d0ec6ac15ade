"""Capture upload on the server: policies per model and cohort, collecting chunks, datasets.

Owns the workflow (``CaptureService``):

- ``enable``/``disable``: the model's policy (cohort selector, sampling, daily byte budget per
  device, chunk size, fields to drop) saved in the registry, then delivered to each device of
  the cohort as a signed ``capture-config`` command (``fleet_server.diagnostics``: signed by
  the online key, addressed, sequenced, expiring; the device persists what it accepted).
- ``collect``: a signed ``capture-upload`` command to each device of the cohort, carrying the
  SHA-256 of the last chunk this server received from it (stored or refused): the device
  deletes that chunk and offers the next one.
- The answers (``_on_answer``): the device's counts are kept; an offer larger than the policy's
  chunk size is refused before a block is pulled (and acknowledged, so the device drops it);
  otherwise the diagnostics upload path pulls it in blocks and checks its SHA-256.
- The verified file (``_on_upload``): ``store.DatasetStore.ingest`` refuses bad chunks and
  records, stores the rest as a content-addressed dataset.

A selector is ``{"group": name}`` or ``{"devices": [ids]}``; ``_cohort`` is the one place that
resolves it, so a label selector is one more branch there.

Does not pull blocks, sign or talk MQTT (``fleet_server.diagnostics``), or serve HTTP
(``fleet_server.admin.ops.capture``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from edge_agent.errors import ContractError, EdgefleetError
from edge_agent.ids import DEVICE_ID_PATTERN
from edge_agent.trust.capture_settings import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    SAMPLE_SCALE,
    UploadSettings,
)
from edge_agent.wire.ops.diagnostics import CommandAnswer, UploadOffer
from fleet_server.capture.store import DatasetStore
from fleet_server.diagnostics.book import CommandRecord
from fleet_server.diagnostics.service import Diagnostics, IssueResult
from fleet_server.errors import CapturePolicyError, UnknownDeviceError
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.registry.evalsets import EvalSetRecord
from fleet_server.registry.ops import datasets as rows
from fleet_server.registry.ops.datasets import CapturePolicy, DatasetRecord
from fleet_server.registry.store import Registry

__all__ = ["DEFAULT_TTL", "MAX_SELECTOR_DEVICES", "CaptureService", "CohortResult"]

log = logging.getLogger(__name__)

DEFAULT_TTL: Final = timedelta(hours=1)
MAX_SELECTOR_DEVICES: Final = 10_000
_COUNT_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class CohortResult:
    """What one operator action sent: the policy, a command per device, the devices that did
    not get one and why."""

    policy: CapturePolicy
    issued: IssueResult

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "policy": self.policy.to_dict(),
            "commands": [c.to_dict() for c in self.issued.commands],
            "errors": self.issued.errors,
        }


def check_selector(selector: object) -> dict[str, Any]:
    """A valid selector, normalised.

    Raises:
        CapturePolicyError: not exactly one of ``group`` (a name) or ``devices`` (1..10,000
            device ids).
    """
    if not isinstance(selector, dict) or len(selector) != 1:
        raise CapturePolicyError('a selector is {"group": name} or {"devices": [ids]}')
    if "group" in selector:
        group = selector["group"]
        if not isinstance(group, str) or not 0 < len(group) <= 128 or not group.isprintable():
            raise CapturePolicyError("group must be a printable name of 1..128 characters")
        return {"group": group}
    devices = selector.get("devices")
    if (
        not isinstance(devices, list)
        or not 0 < len(devices) <= MAX_SELECTOR_DEVICES
        or not all(isinstance(d, str) and DEVICE_ID_PATTERN.fullmatch(d) for d in devices)
    ):
        raise CapturePolicyError(f"devices must be 1..{MAX_SELECTOR_DEVICES} device ids")
    return {"devices": sorted(set(devices))}


def _counts(value: object) -> dict[str, int]:
    """A device's counts, kept only as far as they are well formed (hostile input)."""
    if not isinstance(value, dict):
        return {}
    return {
        k: v
        for k, v in list(value.items())[:32]
        if isinstance(k, str) and _COUNT_KEY.fullmatch(k) and type(v) is int and 0 <= v < 2**53
    }


class CaptureService:
    """The server's capture upload; see the module doc.

    Args:
        registry: the fleet registry (devices, groups, policies, datasets).
        diagnostics: signs, sends and tracks the commands, pulls the uploads.
        store: the dataset files.
        clock: timezone-aware now.
    """

    def __init__(
        self,
        registry: Registry,
        diagnostics: Diagnostics,
        store: DatasetStore,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._registry = registry
        self._diagnostics = diagnostics
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        diagnostics.listen("capture-upload", answer=self._on_answer, upload=self._on_upload)

    @property
    def store(self) -> DatasetStore:
        """The dataset files."""
        return self._store

    # ------------------------------------------------------------------ operator actions
    def enable(
        self,
        model: str,
        selector: object,
        *,
        sample_ppm: int = SAMPLE_SCALE,
        bytes_per_day: int = 16 * 1024 * 1024,
        chunk_bytes: int = 1024 * 1024,
        drop: Sequence[str] = (),
        ttl: timedelta = DEFAULT_TTL,
    ) -> CohortResult:
        """Save the policy and send it to every device of the cohort.

        Raises:
            CapturePolicyError: a bad selector, setting or chunk size, or an empty cohort.
            RegistryUnavailableError: the database failed.
        """
        if type(chunk_bytes) is not int or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise CapturePolicyError(f"chunk_bytes must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        try:
            settings = UploadSettings(model, True, sample_ppm, bytes_per_day, tuple(drop))
        except ContractError as exc:
            raise CapturePolicyError(str(exc)) from exc
        policy = CapturePolicy(
            model,
            True,
            check_selector(selector),
            sample_ppm,
            bytes_per_day,
            chunk_bytes,
            settings.drop,
            self._clock(),
        )
        devices = self._cohort(policy.selector)
        rows.put_capture_policy(self._registry, policy)
        return CohortResult(policy, self._issue(devices, "capture-config", settings.to_dict(), ttl))

    def disable(self, model: str, ttl: timedelta = DEFAULT_TTL) -> CohortResult:
        """Turn upload off for ``model``: the policy is kept, disabled, and every device of its
        cohort is told (a device then refuses ``capture-upload`` for the model).

        Raises:
            CapturePolicyError: no policy for ``model``.
            RegistryUnavailableError: the database failed.
        """
        policy = self._policy(model)
        off = CapturePolicy(
            model,
            False,
            policy.selector,
            policy.sample_ppm,
            policy.bytes_per_day,
            policy.chunk_bytes,
            policy.drop,
            self._clock(),
        )
        rows.put_capture_policy(self._registry, off)
        settings = UploadSettings(model, False, off.sample_ppm, off.bytes_per_day, off.drop)
        devices = self._cohort(off.selector, allow_empty=True)
        return CohortResult(off, self._issue(devices, "capture-config", settings.to_dict(), ttl))

    def collect(self, model: str, ttl: timedelta = DEFAULT_TTL) -> CohortResult:
        """Ask every device of the cohort for its next chunk (acknowledging its last one).

        Raises:
            CapturePolicyError: no enabled policy for ``model``, or an empty cohort.
            RegistryUnavailableError: the database failed.
        """
        policy = self._policy(model)
        if not policy.enabled:
            raise CapturePolicyError(f"capture upload of {model!r} is disabled")
        acks = {d.device_id: d.ack_sha256 for d in rows.capture_devices(self._registry, model)}
        done: list[CommandRecord] = []
        errors: dict[str, str] = {}
        for device in self._cohort(policy.selector):
            args = {"model": model, "ack": acks.get(device, ""), "max_bytes": policy.chunk_bytes}
            one = self._issue([device], "capture-upload", args, ttl)
            done.extend(one.commands)
            errors.update(one.errors)
        self._count("collects")
        return CohortResult(policy, IssueResult(tuple(done), errors))

    def collect_enabled(self, ttl: timedelta = DEFAULT_TTL) -> dict[str, CohortResult]:
        """``collect`` for every model whose upload is on: the server's periodic collection
        (one job on the leader, ``[capture] collect_interval_seconds``). A policy whose cohort
        is empty now is skipped and logged; the others are still collected.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        done: dict[str, CohortResult] = {}
        for policy in rows.capture_policies(self._registry):
            if not policy.enabled:
                continue
            try:
                done[policy.model] = self.collect(policy.model, ttl)
            except CapturePolicyError as exc:
                log.warning("capture: periodic collection of %r skipped: %s", policy.model, exc)
                self._count("collects_skipped")
        return done

    def status(self, model: str | None = None) -> dict[str, Any]:
        """Policies (of ``model`` or all) with each device's upload state, and the counters.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        policies = rows.capture_policies(self._registry)
        out = []
        for p in policies:
            if model is not None and p.model != model:
                continue
            devices = rows.capture_devices(self._registry, p.model)
            out.append({**p.to_dict(), "devices": [d.to_dict() for d in devices]})
        return {"policies": out, "stats": self.stats()}

    def stats(self) -> dict[str, int]:
        """Counters: chunks stored and refused by reason, records refused by reason."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ datasets
    def datasets(self, model: str | None = None, limit: int = 200) -> list[DatasetRecord]:
        """Datasets newest first.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return rows.list_datasets(self._registry, model, limit)

    def dataset(self, sha256: str) -> DatasetRecord:
        """One dataset.

        Raises:
            UnknownDatasetError: no such dataset.
            RegistryUnavailableError: the database failed.
        """
        return rows.get_dataset(self._registry, sha256)

    def register_evalset(
        self,
        sha256: str,
        evalsets: EvalSetStore,
        *,
        input_name: str | None = None,
        note: str = "",
    ) -> tuple[EvalSetRecord, bool]:
        """Register the labelled rows of a dataset as an evaluation set of its model.

        Raises:
            UnknownDatasetError: no such dataset.
            DatasetUnusableError: no labelled row, or the input is not clear.
            CaptureError: the dataset file is missing or damaged.
            EvalSetRejectedError, EvalSetError: the evaluation set store refused it.
            RegistryUnavailableError: the database failed.
        """
        record = self.dataset(sha256)
        data = self._store.evalset_bytes(sha256, input_name)
        return evalsets.add(record.model, data, source=f"dataset {sha256}", note=note)

    # ------------------------------------------------------------------ internals
    def _policy(self, model: str) -> CapturePolicy:
        policy = rows.capture_policy(self._registry, model)
        if policy is None:
            raise CapturePolicyError(f"no capture policy for {model[:64]!r}")
        return policy

    def _cohort(self, selector: Mapping[str, Any], *, allow_empty: bool = False) -> list[str]:
        if "group" in selector:
            found = [
                d.id
                for d in self._registry.list_devices(group=selector["group"], include_revoked=False)
            ]
        else:
            found = []
            for device in selector.get("devices", []):
                try:
                    if self._registry.get_device(device).revoked_at is None:
                        found.append(device)
                except UnknownDeviceError:
                    continue
        if not found and not allow_empty:
            raise CapturePolicyError(f"the selector {selector} matches no active device")
        return found

    def _issue(
        self, devices: Sequence[str], name: str, args: dict[str, Any], ttl: timedelta
    ) -> IssueResult:
        done: list[CommandRecord] = []
        errors: dict[str, str] = {}
        for device in devices:
            try:
                done.extend(self._diagnostics.issue(name, args, device_id=device, ttl=ttl).commands)
            except (EdgefleetError, ValueError) as exc:
                errors[device] = str(exc)
        return IssueResult(tuple(done), errors)

    def _on_answer(self, record: CommandRecord, answer: CommandAnswer) -> bool:
        """A ``capture-upload`` answer: keep the counts; pull the offer if it fits."""
        result = answer.result if isinstance(answer.result, dict) else {}
        model = str(record.args.get("model", ""))
        rows.record_chunk(
            self._registry, model, record.device_id, device_counts=_counts(result.get("counts"))
        )
        policy = rows.capture_policy(self._registry, model)
        raw = result.get("offer")
        if raw is None:
            return False
        try:
            offer = UploadOffer.from_dict(raw)
        except ContractError:
            self._count("chunks_refused_malformed_offer")
            return False
        if policy is None or not policy.enabled:
            self._count("chunks_refused_no_policy")
            return False
        if offer.length > policy.chunk_bytes:
            self._count("chunks_refused_oversized")
            rows.record_chunk(
                self._registry, model, record.device_id, ack_sha256=offer.sha256, refused=True,
                at=self._clock(),
            )  # fmt: skip
            log.warning(
                "capture chunk of %d bytes from %s refused (policy: %d)",
                offer.length,
                record.device_id,
                policy.chunk_bytes,
            )
            return False
        return True

    def _on_upload(self, record: CommandRecord, path: Path) -> None:
        """A verified ``capture-upload`` file: ingest it, then delete it."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("capture chunk %s unreadable: %s", record.id, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        model = str(record.args.get("model", ""))
        policy = rows.capture_policy(self._registry, model)
        if policy is None:
            self._count("chunks_refused_no_policy")
            return
        counts = _counts((record.answer or {}).get("result", {}).get("counts"))
        result = self._store.ingest(record.device_id, policy, data, counts)
        if result.dataset is None and result.refused:
            self._count(f"chunks_refused_{result.refused}")
        else:
            self._count("chunks_stored")
        for reason, n in (result.refused_records or {}).items():
            self._count(f"records_refused_{reason}", n)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
