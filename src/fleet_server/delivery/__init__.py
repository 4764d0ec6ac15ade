"""Getting signed bundles to devices: the bundle library, desired-state documents and block
transfer (serving blocks, re-send rounds).
"""
