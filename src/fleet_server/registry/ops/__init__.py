"""Registry queries of fleet operations (issue 15): agent releases (``agent_releases``) and
captured datasets (``datasets``), each over its tables in ``fleet_server.registry.tables``.
Import each name from its module; this package re-exports nothing.
"""
