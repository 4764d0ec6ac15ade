"""Device only: turning requests into answers.

``agent`` (the ``InferenceService``: gather facts, route, run, account) · ``routing`` (the
``Router``: every decision between the device's live version, the A/B candidate, the shadow and
the cloud fallback) · ``candidates`` (per model: fallback policy, A/B split, shadow runner) ·
``lifecycle`` (which versions serve: activation, installs, rollbacks, probation, drift windows) ·
``registry`` (loading, health checks, memory admission) · ``repository/`` (the model repository
extension's index, load and unload; the version policy's kept versions) · ``pipeline``
(validation, drift, latency) · ``probation`` · ``shadow`` · ``fallback`` and ``fallback_mqtt``
(the guarded cloud call and its transport) · ``capture`` · ``status`` and ``metrics`` (read the
agent's ``AgentSnapshot``) · ``service`` (the interface the front ends call).
"""
