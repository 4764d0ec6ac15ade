"""Drift sketches: what the builder records as a baseline and the device counts live.

Tier A (always on): per feature, counts over bins whose edges are baseline quantiles, plus
under/overflow, NaN, count, sum and sum of squares; exact to merge. Tier B (optional): KLL
quantile sketches from Apache DataSketches. Pure code: arrays in, values out, no I/O.
Scores (PSI/JS/KS, mean shift, NaN rate) compare a window with the baseline (``scores``);
thresholds calibrated to the window and baseline sizes and corrected for the number of features
decide what alerts (``thresholds``); ``DriftMonitor`` windows live traffic (``monitor``).

Typical device use::

    trackers = baseline.input_trackers()
    trackers[name].update(baseline.features(batch))
    window = trackers[name].view()  # ship window.to_bytes()

or, windowed and judged::

    monitor = DriftMonitor(baseline)
    for window in monitor.observe(name, batch, now=time.monotonic()):
        ...  # window.scores, window.verdict.drifted, window.view.to_bytes()
"""

from edge_agent.drift.baseline import DriftBaseline, build_baseline
from edge_agent.drift.edges import FeatureEdges, fit_edges
from edge_agent.drift.features import DEFAULT_MAX_FEATURES, flatten_features
from edge_agent.drift.kll import KllFeatureSketches
from edge_agent.drift.monitor import DriftMonitor, DriftWindow, MonitorPolicy, TensorDriftState
from edge_agent.drift.scores import FeatureScores, score
from edge_agent.drift.thresholds import DriftThresholds, DriftVerdict, judge
from edge_agent.drift.tier_a import TierASketch
from edge_agent.drift.view import TierAView

__all__ = [
    "DEFAULT_MAX_FEATURES",
    "DriftBaseline",
    "DriftMonitor",
    "DriftThresholds",
    "DriftVerdict",
    "DriftWindow",
    "FeatureEdges",
    "FeatureScores",
    "KllFeatureSketches",
    "MonitorPolicy",
    "TensorDriftState",
    "TierASketch",
    "TierAView",
    "build_baseline",
    "fit_edges",
    "flatten_features",
    "judge",
    "score",
]
