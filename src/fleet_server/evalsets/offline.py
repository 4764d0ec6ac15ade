"""The offline comparison before a rollout starts: both versions run on the model's evaluation set.

``OfflineComparer.check(model, from_version, to_version, policy, override=...)`` takes the
model's newest registered evaluation set, loads the published bundles of both versions from the
bundle library (verified against the current trusted root, like the cloud fallback does), runs
each model on the set's raw inputs through the bundle's declared preprocessing (what devices do),
takes the argmax of the scored output as the answer (non-finite scores answer nothing), and
hands both answers to ``edge_agent.quality.compare.compare_models`` and ``judge`` with the
policy's offline limits. The decision (refuse, pass, record the override) is
``fleet_server.rollouts.offline``'s.

Owns the I/O and the model runs. Does not own the comparison nor the rollout (the runner calls
this through its ``OfflinePort`` and keeps the returned ``OfflineCheck``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import EdgefleetError
from edge_agent.quality.compare import ModelComparison, compare_models, judge
from edge_agent.runtime.base import RuntimeOptions
from edge_agent.trust import TrustedRoot
from fleet_server.errors import RegistryError, RegistryUnavailableError
from fleet_server.evalsets.data import EvalSetData
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.offline import (
    admit_offline,
    offline_failed,
    offline_limits,
    offline_skipped,
)
from fleet_server.rollouts.policy import RolloutPolicy
from fleet_server.rollouts.state import OfflineCheck

__all__ = ["OfflineComparer", "Predictions"]

log = logging.getLogger(__name__)
_BATCH = 256


class _ProblemError(Exception):
    """The comparison cannot run; the message says why (shown to the operator)."""


class Predictions:
    """One version's answers on a set: class indices (-1: no answer) and its class count."""

    def __init__(self, answers: npt.NDArray[np.int64], classes: int) -> None:
        self.answers = answers
        self.classes = classes


class OfflineComparer:
    """Runs the offline comparison for the rollout runner (see the module docstring)."""

    def __init__(
        self,
        store: EvalSetStore,
        bundles_dir: Path,
        root: Callable[[], TrustedRoot],
        *,
        clock: Callable[[], datetime],
        options: RuntimeOptions | None = None,
    ) -> None:
        """Compare with the sets of ``store`` and the bundles in ``bundles_dir``."""
        self._store = store
        self._dir = Path(bundles_dir)
        self._root = root
        self._clock = clock
        self._options = options

    def check(
        self,
        model: str,
        from_version: int | None,
        to_version: int,
        policy: RolloutPolicy,
        *,
        override: str = "",
    ) -> tuple[OfflineCheck, Override | None]:
        """The offline check of a rollout of ``model`` from ``from_version`` to ``to_version``.

        Returns:
            The check the rollout keeps (``passed``, ``overridden``, or skipped:
            ``disabled``, ``no_eval_set``, ``no_champion``) and the override used, if any.

        Raises:
            OfflineRegressionError: the candidate regressed beyond the policy's offline limits
                and ``override`` is empty.
            OfflineCheckError: the comparison cannot run (a set that does not fit a version,
                a bundle that cannot be loaded) and ``override`` is empty.
            RolloutPolicyError: the override reason is unprintable or too long.
            RegistryUnavailableError: the database failed.
        """
        if not policy.offline.enabled:
            return offline_skipped("disabled"), None
        record = self._store.latest(model)
        if record is None:
            return offline_skipped("no_eval_set"), None
        if from_version is None or from_version == to_version:
            return offline_skipped("no_champion"), None
        try:
            data = self._store.load(record.sha256)
            champion = self.predict(model, from_version, data)
            challenger = self.predict(model, to_version, data)
            comparison = _compare(data, champion, challenger)
        except RegistryUnavailableError:
            raise
        except (_ProblemError, EdgefleetError) as exc:
            log.warning("offline comparison of %s v%d failed: %s", model, to_version, exc)
            return offline_failed(
                model, to_version, eval_set=record.sha256, problem=str(exc), override=override
            )
        verdict = judge(comparison, offline_limits(policy))
        log.info(
            "offline comparison of %s v%s -> v%d on %s: %d samples, accuracy %+.4f, %s",
            model,
            from_version,
            to_version,
            record.sha256[:12],
            comparison.n,
            comparison.accuracy_delta or 0.0,
            "regressed" if verdict.regressed else "no regression",
        )
        return admit_offline(
            model,
            from_version,
            to_version,
            eval_set=record.sha256,
            comparison=comparison,
            verdict=verdict,
            override=override,
        )

    def predict(self, model: str, version: int, data: EvalSetData) -> Predictions:
        """Run the published bundle of ``model`` v``version`` on ``data``'s inputs.

        Raises:
            _ProblemError: the version is not published, not a single-input classifier, or the
                set does not fit its inputs.
            EdgefleetError: the bundle fails verification, or the runtime refuses it.
            RegistryUnavailableError: the database failed.
        """
        from edge_agent.bundle import read_bundle
        from edge_agent.runtime.loader import load_runtime

        try:
            record = self._store.registry.get_bundle(model, version)
        except RegistryUnavailableError:
            raise
        except RegistryError as exc:
            raise _ProblemError(f"{model} v{version} is not published") from exc
        try:
            bundle = read_bundle(
                self._dir / f"{record.sha256}.bundle",
                self._root(),
                now=self._clock(),
                installed_version=None,
                device=None,
            )
        except OSError as exc:
            raise _ProblemError(f"the bundle of v{version} cannot be read: {exc.strerror}") from exc
        m = bundle.manifest
        out = m.outputs
        if out.task != "classification" or out.score_output is None:
            raise _ProblemError(f"v{version} is a {out.task} model; only classifiers are compared")
        if len(m.inputs.tensors) != 1:
            raise _ProblemError(f"v{version} takes {len(m.inputs.tensors)} inputs; sets hold one")
        spec = m.inputs.tensors[0]
        if len(spec.shape) != data.x.ndim or any(
            d.size is not None and d.size != n
            for d, n in zip(spec.shape[1:], data.sample_shape, strict=True)
        ):
            raise _ProblemError(
                f"the set's samples are {data.sample_shape}, v{version} takes "
                f"{tuple(d.size for d in spec.shape[1:])}"
            )
        batch = max(1, min(_BATCH, spec.shape[0].max))
        runtime = load_runtime(bundle.artifact, m.artifact.format, self._options)
        try:
            dtype = {i.name: i.dtype for i in runtime.inputs}.get(spec.name, spec.dtype)
            scores: list[npt.NDArray[Any]] = []
            for start in range(0, data.samples, batch):
                raw = data.x[start : start + batch].astype(np.float64)
                try:
                    feeds = {spec.name: spec.preprocessing.apply(raw, dtype)}
                except (ValueError, TypeError) as exc:
                    raise _ProblemError(f"the set does not fit v{version}'s preprocessing") from exc
                got = runtime.run(feeds)[out.score_output]
                scores.append(np.asarray(got, dtype=np.float64).reshape(len(raw), -1))
        finally:
            runtime.close()
        s = np.concatenate(scores)
        answers = np.where(np.isfinite(s).all(axis=1), s.argmax(axis=1), -1).astype(np.int64)
        return Predictions(answers, max(len(out.labels), s.shape[1]))


def _compare(data: EvalSetData, champion: Predictions, challenger: Predictions) -> ModelComparison:
    classes = max(champion.classes, challenger.classes)
    if data.classes > classes:
        raise _ProblemError(f"the set labels {data.classes} classes, the models answer {classes}")
    answers = [champion.answers, challenger.answers]
    if any((a < 0).any() for a in answers):
        # Non-finite scores answer nothing: an extra class no label is, so they count wrong.
        answers = [np.where(a < 0, classes, a) for a in answers]
        classes += 1
    return compare_models(data.y, answers[0], answers[1], classes)
