"""Background jobs one fleet-server worker runs behind a leader lock: the rollout runner (applies
the engine's decisions; ``rollout_reader`` reads its inputs) and the history job (folds raw
telemetry into rollups, applies retention), both on one periodic thread (``periodic``).
"""
