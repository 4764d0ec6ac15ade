"""Drift sketches: what the builder records as a baseline and the device counts live.

Tier A (always on): per feature, counts over bins whose edges are baseline quantiles, plus
under/overflow, NaN, count, sum and sum of squares; exact to merge. Tier B (optional): KLL
quantile sketches from Apache DataSketches. Pure code: arrays in, values out, no I/O.
Scores (PSI/JS/KS) and alert thresholds are not here yet; they will build on
``TierAView.probabilities``.

Typical device use::

    trackers = baseline.input_trackers()
    trackers[name].update(baseline.features(batch))
    window = trackers[name].view()  # ship window.to_bytes()
"""

from edge_agent.drift.baseline import DriftBaseline, build_baseline
from edge_agent.drift.edges import FeatureEdges, fit_edges
from edge_agent.drift.features import DEFAULT_MAX_FEATURES, flatten_features
from edge_agent.drift.kll import KllFeatureSketches
from edge_agent.drift.tier_a import TierASketch
from edge_agent.drift.view import TierAView

__all__ = [
    "DEFAULT_MAX_FEATURES",
    "DriftBaseline",
    "FeatureEdges",
    "KllFeatureSketches",
    "TierASketch",
    "TierAView",
    "build_baseline",
    "fit_edges",
    "flatten_features",
]
