"""Device only: the model repository as an operator sees it (the v2 repository extension).

``index`` (pure: each installed model's kept versions with their state, READY / UNAVAILABLE /
LOADING, and why) · ``control`` (``ModelRepository``: load and unload mapped onto the store and
the registry, and the kept versions the ``[serving] version_policy`` serves by number). The
front ends (``edge_agent.api.repository``, ``edge_agent.api.grpc_v2.service``) reach them through
the agent. Re-exports nothing.
"""
