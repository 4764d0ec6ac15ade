"""Device only: the fleet sync loop and what it drives: deploying signed updates, block downloads,
the telemetry outbox and its uplink.
"""
