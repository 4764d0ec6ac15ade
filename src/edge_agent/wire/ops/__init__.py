"""Wire formats of fleet operations (issue 15): remote diagnostics (``diagnostics``: a command's
answer, upload offers and blocks) and device labels (``labels``: keys, values and the limits a
reported label map must keep). Import each name from its module; this package re-exports
nothing.
"""
