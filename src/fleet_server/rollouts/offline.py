"""The offline comparison at the door: may the candidate start, given how it did on the set?

Owns (pure): ``offline_limits`` (the rollout policy's ``offline`` limits as
``edge_agent.quality.compare.ComparisonLimits``) and ``admit_offline`` (a comparison, its
verdict and the operator's override in; the ``OfflineCheck`` the rollout keeps, or a typed
refusal out), plus ``offline_failed`` (the comparison could not run) and ``offline_skipped``
(nothing compared: no evaluation set, no version to compare with, the check turned off).

Does not run the models or read the evaluation sets (``fleet_server.evalsets.offline``), and does
not compare answers (``edge_agent.quality.compare``: the builder's ``--compare-to`` judges with
the same functions).
"""

from __future__ import annotations

from edge_agent.quality.compare import ComparisonLimits, ComparisonVerdict, ModelComparison
from fleet_server.errors import OfflineCheckError, OfflineRegressionError
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.policy import RolloutPolicy
from fleet_server.rollouts.state import OfflineCheck

__all__ = ["admit_offline", "offline_failed", "offline_limits", "offline_skipped"]


def offline_limits(policy: RolloutPolicy) -> ComparisonLimits:
    """The comparison limits of ``policy.offline`` (``z`` is the comparison's own default)."""
    o = policy.offline
    return ComparisonLimits(
        max_accuracy_drop=o.max_accuracy_drop,
        max_recall_drop=o.max_recall_drop,
        min_class_samples=o.min_class_samples,
        min_samples=o.min_samples,
    )


def _override(reason: str) -> Override | None:
    """The validated override, or None when the operator gave none.

    Raises:
        RolloutPolicyError: an unprintable or too long reason.
    """
    return Override("offline", reason) if reason.strip() else None


def admit_offline(
    model: str,
    from_version: int,
    to_version: int,
    *,
    eval_set: str,
    comparison: ModelComparison,
    verdict: ComparisonVerdict,
    override: str = "",
) -> tuple[OfflineCheck, Override | None]:
    """Whether ``model`` v``to_version`` may replace v``from_version``, given the comparison.

    Args:
        model: Model name.
        from_version: The version it replaces (the champion).
        to_version: The candidate (the challenger).
        eval_set: The evaluation set's sha256.
        comparison: Both versions' answers on it.
        verdict: ``judge(comparison, offline_limits(policy))``.
        override: The operator's reason to go ahead despite a regression ("" for none).

    Returns:
        The check to keep in the rollout and the override used (None when not needed).

    Raises:
        OfflineRegressionError: the candidate regressed and no override was given; the message
            names every reason.
        RolloutPolicyError: the override reason is unprintable or too long.
    """
    check = OfflineCheck(
        verdict="passed",
        eval_set=eval_set,
        n=comparison.n,
        disagreement=comparison.disagreement,
        notes=verdict.notes,
        comparison=comparison.to_dict(),
    )
    if not verdict.regressed:
        return check, None
    used = _override(override)
    if used is None:
        raise OfflineRegressionError(
            f"{model} v{to_version} is worse than v{from_version} on evaluation set "
            f"{eval_set[:12]} ({comparison.n} samples): " + "; ".join(verdict.reasons) + ". "
            "Fix the candidate, or roll it out with an override and its reason "
            "(--override-offline REASON)",
            reasons=verdict.reasons,
        )
    return (
        OfflineCheck(
            verdict="overridden",
            eval_set=eval_set,
            n=comparison.n,
            disagreement=comparison.disagreement,
            reasons=verdict.reasons,
            notes=verdict.notes,
            comparison=comparison.to_dict(),
            override=used.reason,
        ),
        used,
    )


def offline_failed(
    model: str, to_version: int, *, eval_set: str, problem: str, override: str = ""
) -> tuple[OfflineCheck, Override]:
    """The comparison could not run (``problem``); go ahead only with an override.

    Raises:
        OfflineCheckError: no override was given.
        RolloutPolicyError: the override reason is unprintable or too long.
    """
    used = _override(override)
    if used is None:
        raise OfflineCheckError(
            f"the offline comparison of {model} v{to_version} on evaluation set "
            f"{eval_set[:12]} cannot run: {problem}. Fix the set or the candidate, or roll it "
            "out with an override and its reason (--override-offline REASON)"
        )
    check = OfflineCheck(
        verdict="overridden",
        eval_set=eval_set,
        reasons=(f"comparison failed: {problem}",),
        override=used.reason,
    )
    return check, used


def offline_skipped(verdict: str) -> OfflineCheck:
    """Nothing was compared: ``no_eval_set``, ``no_champion`` or ``disabled``."""
    if verdict not in ("no_eval_set", "no_champion", "disabled"):
        raise ValueError(f"not a skipped offline verdict: {verdict!r}")
    return OfflineCheck(verdict=verdict)
