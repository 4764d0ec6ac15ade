"""Fleet drift I/O: telemetry history and bundle baselines in, a ``FleetDriftResult`` out.

``DriftService.report`` reads the query's time range from the telemetry history
(``fleet_server.history.drift_inputs``: hourly and 5-minute rollups where folded, raw report rows
only after that), keeps the windows of one model (optionally one version), decodes each view
once, loads each version's baseline once from its bundle file (``<bundles_dir>/<sha256>.bundle``,
cached by digest) and hands everything to the pure ``fleet_server.drift.fleet``. Per-window
problems (undecodable views, unknown tensors, windows of versions without a readable baseline,
edges that are not the baseline's) are counted in the result's ``skipped``, never raised.

Time range: always bounded, in SQL. ``since`` defaults to one hour before now and ``until`` to
now; a range longer than ``MAX_RANGE_SECONDS`` is refused. A window is placed at its report's
server receive time (``received_at``; rollups at their bucket's start, so ``since`` is served at
5-minute resolution, hourly beyond the fine rollups' retention); device clocks (``window_end``)
are not comparable across devices and are no longer used for placement.

The bundle file was verified by the library when it was published and is stored under its
digest; the baseline is read from it without re-verifying signatures (which may have expired
since), but the manifest's name and version must match the registry record.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edge_agent.bundle import read_raw
from edge_agent.contract import BundleManifest
from edge_agent.drift import DriftBaseline, MonitorPolicy, TierAView
from edge_agent.errors import ContractError, EdgefleetError
from fleet_server.drift.cohorts import CohortSpec, DeviceInfo, FleetWindow
from fleet_server.drift.fleet import FleetAccumulator, score_fleet
from fleet_server.drift.results import FleetDriftResult
from fleet_server.errors import (
    BaselineUnavailableError,
    FleetDriftError,
    ModelNotPublishedError,
    RegistryError,
    RegistryUnavailableError,
)
from fleet_server.history.cells import edges_digest
from fleet_server.history.queries import DriftInputs, drift_inputs
from fleet_server.registry.store import Registry

__all__ = ["DriftQuery", "DriftService", "parse_time", "windows_from_payload"]

_PAGE = 2_000
DEFAULT_RANGE_SECONDS = 3600.0
MAX_RANGE_SECONDS = 400 * 86400.0
# ASCII digits only: ``\d`` and ``str.isdigit`` also take '²' and '٣' (``float`` refuses the
# first with a bare ValueError and reads the second as 3).
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_SECONDS = re.compile(r"[0-9]+")
_UNIX = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
BaselineKey = tuple[str, int, str, str]
_NO_VIEW: Any = None  # a probe window only names its baseline key


def _utcnow() -> datetime:
    return datetime.now(UTC)


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``30m``, ``24h``, ``7d`` or ``2w``.

    Raises:
        FleetDriftError: not such a duration, or not positive.
    """
    match = _DURATION.fullmatch(text.strip())
    seconds = float(text) if _SECONDS.fullmatch(text.strip()) else None
    if match is not None:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None or not 0 < seconds < math.inf:
        raise FleetDriftError(f"not a duration (e.g. 30m, 24h, 7d): {text!r}")
    return seconds


def parse_time(text: str, now: datetime) -> float:
    """Unix seconds from ``1767225600``, an ISO-8601 time (naive = UTC) or a relative ``24h``.

    Raises:
        FleetDriftError: none of these.
    """
    raw = text.strip()
    try:
        return float(raw) if _UNIX.fullmatch(raw) else _iso(raw)
    except ValueError:
        pass
    try:
        return now.timestamp() - parse_duration(raw)
    except FleetDriftError:
        raise FleetDriftError(
            f"not a time (Unix seconds, ISO-8601 or e.g. 24h): {text!r}"
        ) from None


def _iso(raw: str) -> float:
    when = datetime.fromisoformat(raw)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class DriftQuery:
    """What to merge: one model, optionally one version, a cohort split and a time range."""

    model: str
    version: int | None = None
    by: CohortSpec = field(default_factory=CohortSpec)
    since: float | None = None
    until: float | None = None
    bucket_seconds: float | None = None
    per_device: bool = True


def _num(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def windows_from_payload(
    device_id: str, payload: Mapping[str, Any], query: DriftQuery, at: float | None = None
) -> tuple[list[FleetWindow], dict[str, int]]:
    """The query's windows in one stored report payload, and what was skipped (by reason).

    Only the fields fleet drift needs are read (the payload was validated at ingest); each
    view is decoded once, strictly (``TierAView.from_bytes``). ``at`` places the windows (the
    row's receive time); without it, the report's ``window_end`` does and the query's range
    is applied to it.
    """
    model = payload.get("models", {}).get(query.model) if isinstance(payload, Mapping) else None
    ranged = at is None
    at = _num(payload.get("window_end")) if at is None else at
    if not isinstance(model, Mapping) or at is None:
        return [], {}
    version = model.get("version")
    if not isinstance(version, int) or (query.version is not None and version != query.version):
        return [], {}
    if ranged and (
        (query.since is not None and at < query.since)
        or (query.until is not None and at >= query.until)
    ):
        return [], {}
    out: list[FleetWindow] = []
    bad = 0
    for w in model.get("drift") or ():
        try:
            tensor, role = w["tensor"], w["role"]
            if not isinstance(tensor, str) or role not in ("input", "output"):
                raise ContractError("bad tensor or role")
            view = TierAView.from_bytes(base64.b64decode(w["view"], validate=True))
        except (ContractError, KeyError, TypeError, binascii.Error, ValueError):
            bad += 1
            continue
        out.append(FleetWindow(device_id, query.model, version, tensor, role, at, view))
    return out, ({"bad_window": bad} if bad else {})


class DriftService:
    """Answers fleet drift queries from the registry and the bundle library's directory."""

    def __init__(
        self,
        registry: Registry,
        bundles_dir: Path,
        *,
        policy: MonitorPolicy | None = None,
        clock: Callable[[], datetime] = _utcnow,
        page: int = _PAGE,
    ) -> None:
        """Read telemetry from ``registry`` and bundles from ``bundles_dir``.

        ``policy`` carries the agent's ``alpha``/``tests``/``correction`` (default: the agent's
        defaults); ``clock`` (timezone-aware now) resolves relative times.
        """
        self._registry = registry
        self._dir = Path(bundles_dir)
        self._policy = policy or MonitorPolicy()
        self._clock = clock
        self._page = page
        self._baselines: dict[str, DriftBaseline] = {}

    def now(self) -> datetime:
        """The service clock (for relative ``since``)."""
        return self._clock()

    def baseline(self, model: str, version: int) -> DriftBaseline:
        """The drift baseline signed into a published version's bundle (cached by digest).

        Raises:
            ModelNotPublishedError: no such version is published.
            BaselineUnavailableError: the bundle file is missing, unreadable or not that model.
            RegistryUnavailableError: the database failed.
        """
        try:
            record = self._registry.get_bundle(model, version)
        except RegistryUnavailableError:
            raise
        except RegistryError as exc:
            raise ModelNotPublishedError(f"{model} v{version} is not published") from exc
        cached = self._baselines.get(record.sha256)
        if cached is not None:
            return cached
        path = self._dir / f"{record.sha256}.bundle"
        try:
            manifest = BundleManifest.from_bytes(read_raw(path).manifest_bytes)
        except (OSError, EdgefleetError) as exc:
            raise BaselineUnavailableError(f"cannot read the baseline from {path}: {exc}") from exc
        if (manifest.name, manifest.version) != (model, version):
            raise BaselineUnavailableError(f"{path} holds {manifest.name} v{manifest.version}")
        self._baselines[record.sha256] = manifest.baseline
        return manifest.baseline

    def report(self, query: DriftQuery) -> FleetDriftResult:
        """Merge and score the query's windows (see the module docstring).

        Raises:
            ModelNotPublishedError: ``query.version`` is given and not published.
            BaselineUnavailableError: ``query.version`` is given and its baseline is unreadable.
            FleetDriftError: a bad bucket size.
            RegistryUnavailableError: the database failed.
        """
        if query.version is not None:
            self.baseline(query.model, query.version)  # fail loudly for an explicit version
        devices: dict[str, DeviceInfo] = {}
        if query.by.kind in ("group", "tag"):
            devices = {
                d: DeviceInfo(group, tags)
                for d, (group, tags) in self._registry.device_groups().items()
            }
        acc = FleetAccumulator(
            query.by, bucket_seconds=query.bucket_seconds, per_device=query.per_device
        )
        views: dict[BaselineKey, TierAView] = {}
        missing: set[int] = set()
        since, until = self._range(query)
        try:
            found = drift_inputs(
                self._registry, query.model, query.version, since, until, query.bucket_seconds
            )
        except ContractError as exc:
            raise RegistryUnavailableError(f"a stored rollup is unreadable: {exc}") from exc
        windows = self._rollup_windows(query, found, acc, views, missing)
        for dev, received, payload in found.raw:
            got, bad = windows_from_payload(dev, payload, query, at=received.timestamp())
            for reason, n in bad.items():
                acc.skip(reason, n)
            windows.extend(got)
        for w in windows:
            base = self._baseline_view(w, views, missing)
            if base is None:
                acc.skip("no_baseline" if w.version in missing else "unknown_tensor", w.windows)
                continue
            acc.add(w, devices.get(w.device_id), base)
        cells, device_cells = acc.merged()
        return score_fleet(
            cells,
            views,
            self._policy,
            spec=query.by,
            device_cells=device_cells,
            skipped=acc.skipped,
        )

    def _rollup_windows(
        self,
        query: DriftQuery,
        found: DriftInputs,
        acc: FleetAccumulator,
        views: dict[BaselineKey, TierAView],
        missing: set[int],
    ) -> list[FleetWindow]:
        """One window per (device, version, tensor, role, query bucket): the rollup parts
        come summed (``history.drift_inputs``), so a view is built once per device."""
        for reason, n in found.skipped.items():
            acc.skip(reason, n)
        out: list[FleetWindow] = []
        for (dev, ver, tensor, role, _qb), (at, part) in found.parts.items():
            probe = FleetWindow(dev, query.model, ver, tensor, role, at, _NO_VIEW, part.windows)
            base = self._baseline_view(probe, views, missing)
            if base is None:
                acc.skip("no_baseline" if ver in missing else "unknown_tensor", part.windows)
                continue
            if part.digest != edges_digest(base.edges):
                reason = "features" if part.n_features != base.n_features else "edges"
                acc.skip(f"{reason}_mismatch", part.windows)
                continue
            try:
                view = part.view(base.edges)
            except ContractError:
                acc.skip("bad_window", part.windows)
                continue
            out.append(FleetWindow(dev, query.model, ver, tensor, role, at, view, part.windows))
        return out

    def _range(self, query: DriftQuery) -> tuple[datetime, datetime]:
        """The query's ``[since, until)`` as aware datetimes, bounded (see the module doc).

        Raises:
            FleetDriftError: an empty, reversed or too long range.
        """
        now = self._clock()
        until = now if query.until is None else datetime.fromtimestamp(query.until, UTC)
        since = (
            until - timedelta(seconds=DEFAULT_RANGE_SECONDS)
            if query.since is None
            else datetime.fromtimestamp(query.since, UTC)
        )
        if since >= until:
            raise FleetDriftError("the time range is empty: since must be before until")
        if (until - since).total_seconds() > MAX_RANGE_SECONDS:
            raise FleetDriftError(
                f"the time range is longer than {MAX_RANGE_SECONDS / 86400:.0f} days"
            )
        return since, until

    def _baseline_view(
        self, w: FleetWindow, views: dict[BaselineKey, TierAView], missing: set[int]
    ) -> TierAView | None:
        key = (w.model, w.version, w.tensor, w.role)
        found = views.get(key)
        if found is not None or w.version in missing:
            return found
        try:
            baseline = self.baseline(w.model, w.version)
        except (ModelNotPublishedError, BaselineUnavailableError):
            missing.add(w.version)
            return None
        try:
            view = baseline.view(w.tensor, w.role)
        except EdgefleetError:
            return None
        views[key] = view
        return view
