"""Wire formats of fleet operations (issue 15): remote diagnostics (``diagnostics``: a command's
answer, upload offers and blocks). Import each name from its module; this package re-exports
nothing.
"""
