"""Memory of failure at the door: may this model version be rolled out, given its history?

Owns: ``Override`` (an operator's recorded reason to roll out a version its history advises
against) and ``admit`` (pure: the version's quarantine and abort count in, the overrides used
out, or a typed refusal). Does not read the history (``fleet_server.registry.rollouts``) nor
create the rollout (``fleet_server.jobs.rollout_runner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fleet_server.errors import AbortedVersionError, QuarantinedVersionError, RolloutPolicyError

__all__ = ["MAX_OVERRIDE_REASON", "OVERRIDE_KINDS", "Override", "admit"]

#: What an operator can override when creating a rollout.
OVERRIDE_KINDS: Final = ("quarantine", "aborted", "offline")
MAX_OVERRIDE_REASON: Final = 512


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RolloutPolicyError(message)


@dataclass(frozen=True)
class Override:
    """An operator's recorded decision to roll out a version its history advises against.

    Attributes:
        kind: ``quarantine`` (the version is quarantined), ``aborted`` (a rollout of it was
            aborted before) or ``offline`` (it regressed on the model's evaluation set, or the
            comparison could not run: ``fleet_server.rollouts.offline``).
        reason: Why the operator went ahead anyway (printable, 1-512 characters).
    """

    kind: str
    reason: str

    def __post_init__(self) -> None:
        """Raises: RolloutPolicyError: an unknown kind or an empty or unprintable reason."""
        _check(self.kind in OVERRIDE_KINDS, f"override kind must be one of {OVERRIDE_KINDS}")
        text = self.reason.strip() if isinstance(self.reason, str) else ""
        _check(
            0 < len(text) <= MAX_OVERRIDE_REASON and text.isprintable(),
            f"an override needs a printable reason of 1-{MAX_OVERRIDE_REASON} characters",
        )
        object.__setattr__(self, "reason", text)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "reason": self.reason}


def admit(
    model: str,
    version: int,
    *,
    quarantine_reason: str | None,
    aborts: int,
    override_quarantine: str = "",
    override_aborted: str = "",
) -> tuple[Override, ...]:
    """Whether ``model`` v``version`` may be rolled out, given its history; the overrides used.

    Args:
        model: Model name.
        version: The version to roll out.
        quarantine_reason: Why the version is quarantined, or None when it is not.
        aborts: How many rollouts of the version were aborted.
        override_quarantine: The operator's reason to roll out a quarantined version anyway.
        override_aborted: The operator's reason to roll out an aborted version again (a
            quarantine override covers earlier aborts too).

    Raises:
        QuarantinedVersionError: quarantined, and no quarantine override.
        AbortedVersionError: aborted before, and no override.
        RolloutPolicyError: an override reason is unprintable or too long.
    """
    out: list[Override] = []
    if quarantine_reason is not None:
        if not override_quarantine.strip():
            raise QuarantinedVersionError(
                f"{model} v{version} is quarantined ({quarantine_reason}); roll it out only "
                "with an override and its reason (--override-quarantine REASON)"
            )
        out.append(Override("quarantine", override_quarantine))
    elif aborts:
        reason = override_aborted.strip() or override_quarantine.strip()
        if not reason:
            raise AbortedVersionError(
                f"{model} v{version} was aborted {aborts} time(s); roll it out again only with "
                "an override and its reason (--override-aborted REASON)"
            )
        out.append(Override("aborted", reason))
    return tuple(out)
