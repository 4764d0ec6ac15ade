"""The agent updates itself: side-by-side releases, an atomic switch, a trial, automatic return.

Modules (each imported by its own name; this package re-exports nothing so that the launcher,
which must stay small and import only the standard library and ``edge_agent.common.durable``,
never pulls in the agent):

    releases   the on-disk layout (``releases/<n>/`` virtualenvs, the ``current`` symlink),
               the persisted state machine ``staged -> trying -> confirmed | rolled_back``
               and its transitions; standard library only
    launcher   the small, stable supervisor systemd runs (``python -m
               edge_agent.selfupdate.launcher``): switches, runs the agent, judges the trial,
               rolls back
    install    what the running agent does with a verified agent package: a new release
               virtualenv over the current dependencies, offline, then ``staged``
    trial      what a new agent on trial does to confirm it is healthy

The operator's view is docs/operations.md, "The agent updates itself".
"""
