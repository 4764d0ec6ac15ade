"""What to build: ``BuildConfig``, the build's settings beside its inputs (model, data, contract).

Owned here so that ``build`` and its helpers in ``build_parts`` share it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.quality.compare import ComparisonLimits
from model_builder.evaluate.gate import GatePolicy


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``target=None`` is the portable ``x86`` on x86-64 hosts and ``arm64`` on
    ARM hosts (never a VNNI-only build by default); ``arch=None`` follows the target.
    ``contract_source`` ("given" or "inferred") is recorded in the report.

    ``compare_limits`` judge the new model against a champion bundle when the build is given
    one (``--compare-to``); ``allow_regression`` is the recorded reason to sign it even when it
    regressed (None: a regression fails the build)."""

    name: str
    version: int
    channel: str = "stable"
    mode: str = "static"
    target: str | None = None
    arch: tuple[str, ...] | None = None
    policy: GatePolicy = field(default_factory=GatePolicy)
    rescue: bool = True
    max_exclusions: int = 8
    n_bins: int = 10
    kll_k: int | None = None
    golden: int = 8
    expires_days: int = 365
    measure_latency: bool = True
    contract_source: str = "given"
    compare_limits: ComparisonLimits = field(default_factory=ComparisonLimits)
    allow_regression: str | None = None
