"""The device's side of fleet operations (issue 15), run by the sync loop: signed remote
commands (``commands``), support bundles (``support_bundle``) and their upload in blocks
(``upload``), certificate renewal (``renewal``) and the agent's own updates (``agent_deploy``).
Import each name from its module; this package re-exports nothing.
"""
