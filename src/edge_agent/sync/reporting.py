"""What the device says about itself: the retained reported state and the local status file.

Owns building ``wire.reported.ReportedState`` (what each model runs, keeps, is assigned,
downloads, the last deploy outcome, and the device's labels: ``device_labels``, the configured
``[labels]`` over a few detected facts), publishing it retained on ``.../reported`` when it
changed (at most once a ``PROGRESS_REPORT_SECONDS`` while only download progress moves, again
after every reconnect: ``forget``), and ``status.json`` beside the outbox for
``edge-agent status`` (at most once a second).

Does not decide deploys or judge desired states (``deploy`` and ``desired_intake`` do); reads
their public results. Runs on the sync thread only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.common.durable import write_atomic
from edge_agent.common.transport import Transport
from edge_agent.errors import EdgefleetError, TransportError
from edge_agent.store import ModelStore
from edge_agent.sync.deploy import Deployer
from edge_agent.trust.agent_release import AGENT_UPDATE_CAPABILITY
from edge_agent.trust.assignment import SHADOW_CAPABILITY
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.ops.labels import parse_labels
from edge_agent.wire.reported import ModelReport, ReportedState, ShadowReport
from edge_agent.wire.topics import Publication

__all__ = ["PROGRESS_REPORT_SECONDS", "ReportedPublisher", "StatusFile", "device_labels"]

log = logging.getLogger("edge_agent.sync.loop")

PROGRESS_REPORT_SECONDS = 1.0


def device_labels(configured: Mapping[str, str]) -> dict[str, str]:
    """The labels the device reports: detected ``hardware`` (machine type, e.g. ``aarch64``)
    and ``os`` (``linux``), overridden by the ``configured`` ones; a detected fact that is not
    a valid label value is left out."""
    detected = {"hardware": platform.machine().lower(), "os": platform.system().lower()}
    return dict(parse_labels({**detected, **configured}).labels)


class ReportedPublisher:
    """Builds and publishes one device's reported state; see the module doc.

    Args:
        store: the model store (installed models and their versions).
        deploy: the deployer (download progress and outcomes).
        client: the broker session to publish on.
        to: the device's ``reported`` publication (topic, QoS, retain: ``Topics.publication``).
        device_id: the device the state names.
        clock: wall-clock seconds for the state's ``at``.
        labels: the device's labels (``device_labels``), reported with every state.
    """

    def __init__(
        self,
        store: ModelStore,
        deploy: Deployer,
        client: Transport,
        to: Publication,
        *,
        device_id: str,
        clock: Callable[[], float],
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._labels = dict(labels or {})
        self._store = store
        self._deploy = deploy
        self._client = client
        self._to = to
        self._device_id = device_id
        self._clock = clock
        self._last_reported = b""
        self._reported_at = 0.0

    def build(self, desired: DesiredState | None) -> ReportedState:
        """What the device runs and downloads now, against the accepted ``desired`` state."""
        accepted = desired.models if desired else {}
        progress = self._deploy.progress()
        models = {}
        for name in sorted(set(self._store.names()) | set(accepted))[:32]:
            try:
                st = self._store.state(name)
            except EdgefleetError:
                continue
            a = accepted.get(name)
            outcome, reason = self._deploy.outcomes.get(name, ("pending", ""))
            shadow = self._deploy.shadow_outcomes.get(name)
            models[name] = ModelReport(
                active=st.active,
                kept=tuple(sorted((r.version for r in st.versions), reverse=True))[:16],
                assigned=a.version if a else None,
                outcome=outcome,
                reason=reason[:1024],
                transfer=progress.get(name),
                shadow=None
                if shadow is None
                else ShadowReport(shadow[0], shadow[1], shadow[2][:1024]),
            )
        return ReportedState(
            device_id=self._device_id,
            at=self._clock(),
            agent_version=__version__,
            desired_version=desired.version if desired else 0,
            models=models,
            capabilities=(SHADOW_CAPABILITY, AGENT_UPDATE_CAPABILITY)
            if self._deploy.agent_update.capable
            else (SHADOW_CAPABILITY,),
            agent=self._deploy.agent_update.report(),
            labels=self._labels,
        )

    @property
    def published(self) -> bool:
        """True once a reported state went out on this connection (an agent on trial waits
        for it before confirming: the server has then heard from it)."""
        return bool(self._last_reported)

    def forget(self) -> None:
        """Publish the next state even if unchanged (the broker may have lost the retained
        copy: called after every reconnect)."""
        self._last_reported = b""

    def publish(self, state: ReportedState) -> None:
        """Publish ``state`` retained if it changed; offline: left for after the reconnect."""
        body = dataclasses.replace(state, at=0.0).to_bytes()  # what changed, not when
        now = time.monotonic()
        if body == self._last_reported:
            return
        downloading = any(m.transfer is not None for m in state.models.values())
        if (
            downloading
            and self._last_reported
            and now - self._reported_at < PROGRESS_REPORT_SECONDS
        ):
            return
        try:
            self._client.publish(self._to.topic, state.to_bytes(), self._to.qos, self._to.retain)
        except TransportError:
            return  # offline: published after the reconnect
        self._last_reported = body
        self._reported_at = now


class StatusFile:
    """``status.json`` for ``edge-agent status``, rewritten only when it changed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._written = b""
        self._at = 0.0

    def write(self, status: Callable[[], dict[str, Any]], state: ReportedState) -> None:
        """Write ``status()`` with ``state`` (at most once a second; never raises)."""
        now = time.monotonic()
        if now - self._at < 1.0:
            return
        self._at = now
        try:
            body = json.dumps({**status(), "reported": state.to_dict()}, sort_keys=True).encode()
        except (EdgefleetError, ValueError, TypeError) as exc:
            log.debug("sync status not written: %s", exc)
            return
        if body != self._written:
            try:
                write_atomic(self._path, body)
            except OSError as exc:
                log.debug("sync status not written: %s", exc)
                return
            self._written = body
