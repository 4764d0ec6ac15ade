"""Model quality on labelled answers, shared by every role. Pure.

``confusion``: counts of (true class, predicted class) pairs, a mergeable value (the device
aggregates ground truth into it, telemetry carries it, the server merges it per version and
cohort). ``compare``: champion against challenger on one labelled evaluation set (the builder's
``--compare-to`` and the server's check before a rollout run the same comparison) and the
verdict against the policy's limits.
"""
