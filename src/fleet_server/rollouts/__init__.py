"""Rollouts in waves with quality gates: the pure engine and its gates, the metrics they read,
admission (memory of failures) and the runner that applies decisions.
"""
