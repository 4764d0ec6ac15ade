"""Admin API routes of fleet operations (issue 15): remote diagnostics (``diagnostics``), labels,
label groups and maintenance windows (``labels``), agent releases (``agents``), and the claim
enrollment listener (``enrollment``). Import each name from its module; this package re-exports
nothing.
"""
