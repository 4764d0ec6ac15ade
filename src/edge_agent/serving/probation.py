"""Probation of a newly activated model: pure decision from counts, policy and elapsed time.

A new version serves real traffic on probation. It fails as soon as a window of at least
``MIN_REQUESTS`` requests shows an error rate, validation-reject rate or p99 latency above the
policy; it passes after ``probation_requests`` requests or ``probation_seconds``, whichever comes
first, without having failed. The caller rolls back on failure and marks the version good on
success.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.config import ModelPolicy

MIN_REQUESTS = 20
PENDING = "pending"
PASSED = "passed"
FAILED = "failed"


@dataclass(frozen=True)
class ProbationStats:
    """What the model did since activation."""

    requests: int
    errors: int
    rejects: int
    p99_ms: float
    elapsed_s: float


@dataclass(frozen=True)
class ProbationVerdict:
    status: str
    reason: str = ""


def judge_probation(stats: ProbationStats, policy: ModelPolicy) -> ProbationVerdict:
    """``passed``, ``failed`` (with the reason) or still ``pending``."""
    if stats.requests >= MIN_REQUESTS:
        error_rate = stats.errors / stats.requests
        reject_rate = stats.rejects / stats.requests
        if error_rate > policy.max_error_rate:
            return ProbationVerdict(
                FAILED, f"error rate {error_rate:.1%} > {policy.max_error_rate:.1%}"
            )
        if reject_rate > policy.max_reject_rate:
            return ProbationVerdict(
                FAILED, f"validation reject rate {reject_rate:.1%} > {policy.max_reject_rate:.1%}"
            )
        if stats.p99_ms > policy.max_p99_ms:
            return ProbationVerdict(
                FAILED, f"p99 latency {stats.p99_ms:.1f} ms > {policy.max_p99_ms:.1f} ms"
            )
    if stats.requests >= policy.probation_requests or stats.elapsed_s >= policy.probation_seconds:
        return ProbationVerdict(PASSED)
    return ProbationVerdict(PENDING)
