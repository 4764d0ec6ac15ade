"""Device only: turning requests into answers. The agent, its routing (local, A/B, shadow, cloud
fallback), the per-model pipeline (validation, drift, probation), capture and the loaded-model
registry.
"""
