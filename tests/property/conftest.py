"""Hypothesis settings for the parser properties: a bounded, deterministic budget in the suite.

``EDGEFLEET_HYPOTHESIS=deep`` runs many more examples (random seeds) when hunting locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "edgefleet",
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,  # no .hypothesis directory in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "deep",
    max_examples=5000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("EDGEFLEET_HYPOTHESIS", "edgefleet"))
